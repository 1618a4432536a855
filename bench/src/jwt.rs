//! JWTs as Symfony would sign them (HS256), for the simulated clients of the benchmarks
//! and the demo.

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

/// A token for `user` of `tenant` with one Symfony role, valid for an hour.
pub fn hs256(secret: &str, issuer: &str, user: &str, tenant: &str, role: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        + 3600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({ "iss": issuer, "exp": exp, "sub": user, "tenant_id": tenant, "roles": [role] }),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing never fails")
}
