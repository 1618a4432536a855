//! Authentication of browser sessions: JWTs issued by Symfony.
//!
//! Keys: an HS256 shared secret, an RS256 or ES256 public key in PEM (as
//! LexikJWTAuthenticationBundle issues them) and a JWKS file. Every key belongs to an
//! issuer; a token's key is looked up by its `iss` claim and its `kid` header together,
//! never by `kid` alone, so one issuer can never sign for another. Issuer, audience,
//! expiry and not-before are checked with a small leeway. Claims give the user id, the
//! tenant id and the Symfony roles, mapped to Pulse roles by the schema file.
//!
//! This module decides who someone is, never what they may do (that is
//! `pulse_shared::caps::authorize`). The deploy key is checked by [`crate::App`].

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pulse_shared::Principal;

use crate::config::AuthConfig;
use crate::schema::Schema;

/// Why a token was refused. Every variant maps to `unauthenticated`; the message tells
/// the client which check failed without echoing the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a JWT at all.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// No key for this issuer and key id.
    #[error("no key is configured for issuer {issuer:?} and key id {kid:?}")]
    UnknownKey {
        /// `iss` claim.
        issuer: String,
        /// `kid` header.
        kid: Option<String>,
    },
    /// The signature does not verify (forged, or signed with another key).
    #[error("the token's signature is invalid")]
    BadSignature,
    /// Expired.
    #[error("the token has expired; fetch a fresh one from the application and send it in a token frame")]
    Expired,
    /// Not yet valid.
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    /// Wrong issuer or audience.
    #[error("the token's {0} is not accepted by this server")]
    WrongClaim(&'static str),
    /// A claim Pulse needs is missing.
    #[error("the token has no {0} claim")]
    MissingClaim(String),
    /// Tokens are not configured at all.
    #[error("token authentication is not configured on this server (auth.issuer and a key)")]
    NotConfigured,
}

/// A verified token.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Who it is.
    pub principal: Principal,
    /// When the token stops being valid (expiry plus leeway).
    pub expires: SystemTime,
}

struct Key {
    issuer: String,
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens against the configured keys.
pub struct Authenticator {
    keys: Vec<Key>,
    audience: Option<String>,
    leeway: u64,
    user_claim: String,
    tenant_claim: String,
    roles_claim: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "keys",
                &self
                    .keys
                    .iter()
                    .map(|k| (&k.issuer, &k.kid, k.algorithm))
                    .collect::<Vec<_>>(),
            )
            .field("audience", &self.audience)
            .finish()
    }
}

/// A problem with the key configuration, found at start.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct KeyConfigError {
    /// The config key.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
}

impl Authenticator {
    /// Builds the key ring from the configuration, reading PEM and JWKS files.
    pub fn from_config(c: &AuthConfig) -> Result<Authenticator, KeyConfigError> {
        let mut keys = Vec::new();
        let kid = (!c.key_id.is_empty()).then(|| c.key_id.clone());
        let needs_issuer = |key: &'static str| KeyConfigError {
            key,
            message: "a key needs auth.issuer: every key belongs to an issuer".into(),
        };
        if !c.hs256_secret.is_empty() {
            if c.issuer.is_empty() {
                return Err(needs_issuer("auth.hs256_secret"));
            }
            if c.hs256_secret.expose().len() < 32 {
                return Err(KeyConfigError {
                    key: "auth.hs256_secret",
                    message: "at least 32 characters are needed".into(),
                });
            }
            keys.push(Key {
                issuer: c.issuer.clone(),
                kid: kid.clone(),
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(c.hs256_secret.expose().as_bytes()),
            });
        }
        if let Some(path) = &c.public_key_path {
            if c.issuer.is_empty() {
                return Err(needs_issuer("auth.public_key_path"));
            }
            let pem = std::fs::read(path).map_err(|e| KeyConfigError {
                key: "auth.public_key_path",
                message: format!("cannot read {}: {e}", path.display()),
            })?;
            let (algorithm, key) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, k)
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (Algorithm::ES256, k)
            } else {
                return Err(KeyConfigError {
                    key: "auth.public_key_path",
                    message: format!(
                        "{} is not an RSA or P-256 public key in PEM (the public.pem of LexikJWTAuthenticationBundle)",
                        path.display()
                    ),
                });
            };
            keys.push(Key {
                issuer: c.issuer.clone(),
                kid: kid.clone(),
                algorithm,
                key,
            });
        }
        if let Some(path) = &c.jwks_path {
            let issuer = if c.jwks_issuer.is_empty() {
                c.issuer.clone()
            } else {
                c.jwks_issuer.clone()
            };
            if issuer.is_empty() {
                return Err(needs_issuer("auth.jwks_path"));
            }
            let bad = |message: String| KeyConfigError {
                key: "auth.jwks_path",
                message,
            };
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
            let set: JwkSet = serde_json::from_str(&text)
                .map_err(|e| bad(format!("{} is not a JWKS document: {e}", path.display())))?;
            for jwk in &set.keys {
                let Some(kid) = jwk.common.key_id.clone() else {
                    return Err(bad("every key of the JWKS needs a kid".into()));
                };
                let algorithm = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
                    _ => {
                        return Err(bad(format!(
                            "key {kid:?}: only RSA, EC P-256 and oct keys are supported"
                        )));
                    }
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("key {kid:?}: {e}")))?;
                keys.push(Key {
                    issuer: issuer.clone(),
                    kid: Some(kid),
                    algorithm,
                    key,
                });
            }
        }
        Ok(Authenticator {
            keys,
            audience: (!c.audience.is_empty()).then(|| c.audience.clone()),
            leeway: c.leeway_secs,
            user_claim: c.user_claim.clone(),
            tenant_claim: c.tenant_claim.clone(),
            roles_claim: c.roles_claim.clone(),
        })
    }

    /// Whether any key is configured.
    pub fn is_configured(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Verifies a token and maps its claims to a principal.
    pub fn verify(&self, token: &str, schema: &Schema) -> Result<Verified, AuthError> {
        if self.keys.is_empty() {
            return Err(AuthError::NotConfigured);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        // The issuer is read before the signature is checked only to choose the key; the
        // chosen key then verifies the signature over that same claim.
        let unverified: HashMap<String, serde_json::Value> =
            jsonwebtoken::dangerous::insecure_decode_claims(token)
                .map_err(|e| AuthError::Malformed(e.to_string()))?;
        let issuer = unverified
            .get("iss")
            .and_then(|v| v.as_str())
            .ok_or_else(|| AuthError::MissingClaim("iss".into()))?
            .to_string();
        let key = self
            .keys
            .iter()
            .find(|k| k.issuer == issuer && k.kid == header.kid)
            .ok_or_else(|| AuthError::UnknownKey {
                issuer: issuer.clone(),
                kid: header.kid.clone(),
            })?;
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.set_issuer(&[&key.issuer]);
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            }
            None => {
                validation.validate_aud = false;
                validation.set_required_spec_claims(&["exp", "iss"]);
            }
        }
        let data = jsonwebtoken::decode::<HashMap<String, serde_json::Value>>(token, &key.key, &validation)
            .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature | K::InvalidAlgorithm | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => {
                    AuthError::BadSignature
                }
                K::ExpiredSignature => AuthError::Expired,
                K::ImmatureSignature => AuthError::NotYetValid,
                K::InvalidIssuer => AuthError::WrongClaim("issuer"),
                K::InvalidAudience => AuthError::WrongClaim("audience"),
                K::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
                other => AuthError::Malformed(format!("{other:?}")),
            }
        })?;
        let claims = data.claims;
        let text = |name: &str| -> Option<String> {
            match claims.get(name)? {
                serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        let user = text(&self.user_claim).ok_or_else(|| AuthError::MissingClaim(self.user_claim.clone()))?;
        let tenant = text(&self.tenant_claim);
        let role_names: Vec<&str> = match claims.get(&self.roles_claim) {
            Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_str()).collect(),
            Some(serde_json::Value::String(s)) => vec![s.as_str()],
            _ => Vec::new(),
        };
        let roles = schema.map_roles(role_names);
        let exp = claims.get("exp").and_then(|v| v.as_u64()).unwrap_or(0);
        Ok(Verified {
            principal: Principal {
                user: Some(user),
                tenant,
                roles,
            },
            expires: UNIX_EPOCH + Duration::from_secs(exp.saturating_add(self.leeway)),
        })
    }
}

/// Seconds since the epoch, for tests and token lifetimes.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use pulse_shared::Role;

    fn config(secret: &str) -> AuthConfig {
        AuthConfig {
            issuer: "symfony".into(),
            audience: "pulse".into(),
            hs256_secret: Secret::new(secret),
            public_key_path: None,
            jwks_path: None,
            jwks_issuer: String::new(),
            key_id: String::new(),
            leeway_secs: 5,
            user_claim: "sub".into(),
            tenant_claim: "tenant_id".into(),
            roles_claim: "roles".into(),
        }
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn hs256_tokens_verify_and_map_roles() {
        let secret = "s".repeat(40);
        let a = Authenticator::from_config(&config(&secret)).unwrap();
        let now = now_secs();
        let good = serde_json::json!({"iss": "symfony", "aud": "pulse", "exp": now + 60, "sub": "u1", "tenant_id": 7, "roles": ["ROLE_USER", "ROLE_ADMIN"]});
        let v = a
            .verify(&token(&secret, good.clone()), &Schema::default())
            .unwrap();
        assert_eq!(v.principal.user.as_deref(), Some("u1"));
        assert_eq!(v.principal.tenant.as_deref(), Some("7"));
        assert_eq!(v.principal.roles, vec![Role::TenantAdmin, Role::Member]);

        let forged = token(&"x".repeat(40), good.clone());
        assert_eq!(
            a.verify(&forged, &Schema::default()).unwrap_err(),
            AuthError::BadSignature
        );
        let mut expired = good.clone();
        expired["exp"] = (now - 60).into();
        assert_eq!(
            a.verify(&token(&secret, expired), &Schema::default())
                .unwrap_err(),
            AuthError::Expired
        );
        // Within the leeway it still passes.
        let mut just = good.clone();
        just["exp"] = (now - 2).into();
        assert!(a.verify(&token(&secret, just), &Schema::default()).is_ok());
        let mut early = good.clone();
        early["nbf"] = (now + 600).into();
        assert_eq!(
            a.verify(&token(&secret, early), &Schema::default()).unwrap_err(),
            AuthError::NotYetValid
        );
        let mut other_iss = good.clone();
        other_iss["iss"] = "evil".into();
        assert!(matches!(
            a.verify(&token(&secret, other_iss), &Schema::default())
                .unwrap_err(),
            AuthError::UnknownKey { .. }
        ));
        let mut other_aud = good.clone();
        other_aud["aud"] = "someone-else".into();
        assert_eq!(
            a.verify(&token(&secret, other_aud), &Schema::default())
                .unwrap_err(),
            AuthError::WrongClaim("audience")
        );
        for bad in ["", "abc", "a.b.c", "....", "e30.e30.e30"] {
            assert!(a.verify(bad, &Schema::default()).is_err(), "{bad:?}");
        }
        // A token claiming the service role never gets it: the deploy key is the only way.
        let mut service = good;
        service["roles"] = serde_json::json!(["service"]);
        assert!(
            a.verify(&token(&secret, service), &Schema::default())
                .unwrap()
                .principal
                .roles
                .is_empty()
        );
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/jwt")
            .join(name)
    }

    fn claims(iss: &str) -> serde_json::Value {
        serde_json::json!({"iss": iss, "aud": "pulse", "exp": now_secs() + 60, "sub": "u1", "tenant_id": "t1", "roles": ["ROLE_USER"]})
    }

    #[test]
    fn rs256_and_es256_pem_keys_verify_and_refuse_algorithm_confusion() {
        for (alg, public, private) in [
            (Algorithm::RS256, "rs256-public.pem", "rs256-private.pem"),
            (Algorithm::ES256, "es256-public.pem", "es256-private.pem"),
        ] {
            let mut c = config("");
            c.public_key_path = Some(fixture(public));
            let a = Authenticator::from_config(&c).unwrap();
            let pem = std::fs::read(fixture(private)).unwrap();
            let key = match alg {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
                _ => EncodingKey::from_ec_pem(&pem).unwrap(),
            };
            let t = encode(&Header::new(alg), &claims("symfony"), &key).unwrap();
            assert!(a.verify(&t, &Schema::default()).is_ok(), "{alg:?}");
            // HS256 "signed" with the public key's bytes must not pass as the PEM key.
            let public_bytes = std::fs::read(fixture(public)).unwrap();
            let confused = encode(
                &Header::new(Algorithm::HS256),
                &claims("symfony"),
                &EncodingKey::from_secret(&public_bytes),
            )
            .unwrap();
            assert_eq!(
                a.verify(&confused, &Schema::default()).unwrap_err(),
                AuthError::BadSignature,
                "{alg:?}"
            );
        }
        let mut c = config("");
        c.public_key_path = Some(fixture("README.md"));
        assert_eq!(
            Authenticator::from_config(&c).unwrap_err().key,
            "auth.public_key_path"
        );
    }

    #[test]
    fn jwks_keys_are_found_by_issuer_and_kid_together() {
        let pem = std::fs::read(fixture("rs256-private.pem")).unwrap();
        let key = EncodingKey::from_rsa_pem(&pem).unwrap();
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some("k1".into());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap()).unwrap();
        let secret = "s".repeat(40);
        let mut c = config(&secret);
        c.jwks_path = Some(path);
        c.jwks_issuer = "idp".into();
        let a = Authenticator::from_config(&c).unwrap();
        let signed = |iss: &str, kid: Option<&str>| {
            let mut h = Header::new(Algorithm::RS256);
            h.kid = kid.map(String::from);
            encode(&h, &claims(iss), &key).unwrap()
        };
        assert!(a.verify(&signed("idp", Some("k1")), &Schema::default()).is_ok());
        assert!(matches!(
            a.verify(&signed("idp", Some("k2")), &Schema::default())
                .unwrap_err(),
            AuthError::UnknownKey { .. }
        ));
        // The same kid under another issuer is another key: never found by kid alone.
        assert!(matches!(
            a.verify(&signed("symfony", Some("k1")), &Schema::default())
                .unwrap_err(),
            AuthError::UnknownKey { .. }
        ));
        // The HS256 key of "symfony" still works beside the JWKS.
        assert!(
            a.verify(&token(&secret, claims("symfony")), &Schema::default())
                .is_ok()
        );
    }
}
