//! Platform settings of the product page: Deployment URL, Deploy Key, Enable Real-time,
//! Sync Interval.
//!
//! The config file and environment give the defaults; an edit (from pulsetop or a
//! Symfony command) is validated, stored in `pulse.settings` and audited in
//! `pulse.audit_log` in one transaction, and takes effect live through a watch channel.
//! The deploy key is stored as a SHA-256 digest only: Pulse verifies it, never shows it,
//! never logs it, and keeps no copy in clear. Other instances pick edits up on their next
//! refresh.

use std::fmt;
use std::sync::{Arc, RwLock};

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::{PlatformDefaults, Secret};

/// One of the four settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SettingKey {
    /// Deployment URL.
    DeploymentUrl,
    /// Deploy Key (secret).
    DeployKey,
    /// Enable Real-time.
    EnableRealtime,
    /// Sync Interval (ms).
    SyncIntervalMs,
}

impl SettingKey {
    /// All four, in the product page's order.
    pub const ALL: [SettingKey; 4] = [
        SettingKey::DeploymentUrl,
        SettingKey::DeployKey,
        SettingKey::EnableRealtime,
        SettingKey::SyncIntervalMs,
    ];

    /// The key's stable name (as stored and as sent by the console and commands).
    pub const fn as_str(self) -> &'static str {
        match self {
            SettingKey::DeploymentUrl => "deployment_url",
            SettingKey::DeployKey => "deploy_key",
            SettingKey::EnableRealtime => "enable_realtime",
            SettingKey::SyncIntervalMs => "sync_interval_ms",
        }
    }

    /// The product page's label.
    pub const fn label(self) -> &'static str {
        match self {
            SettingKey::DeploymentUrl => "Deployment URL",
            SettingKey::DeployKey => "Deploy Key",
            SettingKey::EnableRealtime => "Enable Real-time",
            SettingKey::SyncIntervalMs => "Sync Interval",
        }
    }

    /// Parses a stable name.
    pub fn parse(name: &str) -> Option<SettingKey> {
        SettingKey::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether the value is secret.
    pub const fn secret(self) -> bool {
        matches!(self, SettingKey::DeployKey)
    }
}

impl fmt::Display for SettingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The settings in force.
#[derive(Clone, PartialEq, Eq)]
pub struct PlatformSettings {
    /// Deployment URL.
    pub deployment_url: String,
    /// SHA-256 of the deploy key, hex; empty when no key is set (service access off).
    pub deploy_key_sha256: String,
    /// Enable Real-time.
    pub enable_realtime: bool,
    /// Sync Interval, ms.
    pub sync_interval_ms: u64,
}

impl fmt::Debug for PlatformSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlatformSettings")
            .field("deployment_url", &self.deployment_url)
            .field(
                "deploy_key",
                &if self.deploy_key_sha256.is_empty() {
                    "<unset>"
                } else {
                    "***"
                },
            )
            .field("enable_realtime", &self.enable_realtime)
            .field("sync_interval_ms", &self.sync_interval_ms)
            .finish()
    }
}

/// One setting as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingView {
    /// The key.
    pub key: SettingKey,
    /// The value, `***` for a set secret.
    pub shown: String,
    /// `default` (config) or `edited by X at T`.
    pub source: String,
}

/// Why an edit was refused.
#[derive(Debug, thiserror::Error)]
pub enum SettingError {
    /// The key is not one of the four.
    #[error(
        "unknown setting {0:?}; the settings are deployment_url, deploy_key, enable_realtime, sync_interval_ms"
    )]
    UnknownKey(String),
    /// The value fails validation; the message says what is expected.
    #[error("invalid value for {key}: {expected}")]
    Invalid {
        /// The key.
        key: SettingKey,
        /// What is expected.
        expected: &'static str,
    },
    /// The state database failed.
    #[error("cannot store the setting: {0}")]
    Db(String),
}

impl SettingError {
    /// The client error code.
    pub fn code(&self) -> pulse_shared::ErrorCode {
        match self {
            SettingError::UnknownKey(_) | SettingError::Invalid { .. } => {
                pulse_shared::ErrorCode::InvalidArgument
            }
            SettingError::Db(_) => pulse_shared::ErrorCode::Unavailable,
        }
    }
}

/// The SHA-256 digest, hex, that the deploy key is stored as.
pub fn digest_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Validates a value and returns its stored JSON form.
pub fn validate(key: SettingKey, raw: &str) -> Result<serde_json::Value, SettingError> {
    let raw = raw.trim();
    match key {
        SettingKey::DeploymentUrl => {
            let ok = url::Url::parse(raw).map(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
            if ok.unwrap_or(false) {
                Ok(json!(raw))
            } else {
                Err(SettingError::Invalid {
                    key,
                    expected: "an http:// or https:// URL with a host",
                })
            }
        }
        SettingKey::DeployKey => {
            if raw.len() >= 32 && raw.chars().all(|c| c.is_ascii_graphic()) {
                Ok(json!(digest_key(raw)))
            } else {
                Err(SettingError::Invalid {
                    key,
                    expected: "at least 32 printable characters without spaces",
                })
            }
        }
        SettingKey::EnableRealtime => match raw.to_ascii_lowercase().as_str() {
            "true" | "on" | "yes" | "1" => Ok(json!(true)),
            "false" | "off" | "no" | "0" => Ok(json!(false)),
            _ => Err(SettingError::Invalid {
                key,
                expected: "true or false",
            }),
        },
        SettingKey::SyncIntervalMs => match raw.parse::<u64>() {
            Ok(n) if (100..=3_600_000).contains(&n) => Ok(json!(n)),
            _ => Err(SettingError::Invalid {
                key,
                expected: "a whole number of milliseconds from 100 to 3600000",
            }),
        },
    }
}

/// The live settings of this instance.
pub struct Settings {
    defaults: PlatformSettings,
    /// Who edited each key and when, for the console.
    edits: RwLock<Vec<(SettingKey, String)>>,
    tx: watch::Sender<PlatformSettings>,
}

impl Settings {
    /// Settings with only the config defaults (before the database is read).
    pub fn new(defaults: &PlatformDefaults) -> Arc<Settings> {
        let defaults = PlatformSettings {
            deployment_url: defaults.deployment_url.clone(),
            deploy_key_sha256: if defaults.deploy_key.is_empty() {
                String::new()
            } else {
                digest_key(defaults.deploy_key.expose())
            },
            enable_realtime: defaults.enable_realtime,
            sync_interval_ms: defaults.sync_interval_ms,
        };
        let (tx, _) = watch::channel(defaults.clone());
        Arc::new(Settings {
            defaults,
            edits: RwLock::new(Vec::new()),
            tx,
        })
    }

    /// The settings in force.
    pub fn current(&self) -> PlatformSettings {
        self.tx.borrow().clone()
    }

    /// Follows changes (sessions use it to tell clients when real-time is switched).
    pub fn subscribe(&self) -> watch::Receiver<PlatformSettings> {
        self.tx.subscribe()
    }

    /// Constant-time check of a presented deploy key; an unset key matches nothing.
    pub fn deploy_key_matches(&self, candidate: &str) -> bool {
        let stored = self.current().deploy_key_sha256;
        if stored.is_empty() {
            return false;
        }
        let presented = digest_key(candidate);
        stored.len() == presented.len()
            && stored
                .bytes()
                .zip(presented.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Every setting, secrets masked, with where its value came from.
    pub fn list(&self) -> Vec<SettingView> {
        let now = self.current();
        let edits = self.edits.read().expect("settings lock").clone();
        SettingKey::ALL
            .into_iter()
            .map(|key| {
                let shown = match key {
                    SettingKey::DeploymentUrl => now.deployment_url.clone(),
                    SettingKey::DeployKey if now.deploy_key_sha256.is_empty() => "(not set)".into(),
                    SettingKey::DeployKey => "***".into(),
                    SettingKey::EnableRealtime => now.enable_realtime.to_string(),
                    SettingKey::SyncIntervalMs => now.sync_interval_ms.to_string(),
                };
                let source = edits
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, s)| s.clone())
                    .unwrap_or_else(|| "config".into());
                SettingView { key, shown, source }
            })
            .collect()
    }

    /// Reads the stored edits and lays them over the defaults.
    pub async fn refresh(&self, client: &tokio_postgres::Client) -> Result<(), SettingError> {
        let rows = client
            .query(
                "SELECT key, value, updated_by, updated_at::text FROM pulse.settings",
                &[],
            )
            .await
            .map_err(|e| SettingError::Db(e.to_string()))?;
        let mut next = self.defaults.clone();
        let mut edits = Vec::new();
        for row in rows {
            let name: String = row.get(0);
            let value: serde_json::Value = row.get(1);
            let Some(key) = SettingKey::parse(&name) else {
                tracing::warn!(key = %name, "ignoring an unknown stored setting");
                continue;
            };
            apply(&mut next, key, &value);
            edits.push((
                key,
                format!(
                    "edited by {} at {}",
                    row.get::<_, String>(2),
                    row.get::<_, String>(3)
                ),
            ));
        }
        *self.edits.write().expect("settings lock") = edits;
        self.tx.send_if_modified(|cur| {
            let changed = *cur != next;
            *cur = next;
            changed
        });
        Ok(())
    }

    /// Validates, stores and audits one edit, then applies it. The audit record never holds
    /// a secret: a deploy key change is recorded as a rotation.
    pub async fn update(
        &self,
        client: &mut tokio_postgres::Client,
        key: &str,
        raw: &str,
        actor: &str,
    ) -> Result<SettingKey, SettingError> {
        let key = SettingKey::parse(key).ok_or_else(|| SettingError::UnknownKey(key.to_string()))?;
        let value = validate(key, raw)?;
        let before = self
            .list()
            .into_iter()
            .find(|v| v.key == key)
            .map(|v| v.shown)
            .unwrap_or_default();
        let details = if key.secret() {
            json!({ "rotated": true })
        } else {
            json!({ "from": before, "to": value })
        };
        let db = |e: tokio_postgres::Error| SettingError::Db(e.to_string());
        let tx = client.transaction().await.map_err(db)?;
        tx.execute(
            "INSERT INTO pulse.settings (key, value, updated_at, updated_by) VALUES ($1, $2, now(), $3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now(), updated_by = excluded.updated_by",
            &[&key.as_str(), &value, &actor],
        )
        .await
        .map_err(db)?;
        tx.execute(
            "INSERT INTO pulse.audit_log (actor, action, target, details) VALUES ($1, 'setting.update', $2, $3)",
            &[&actor, &key.as_str(), &details],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        tracing::info!(setting = %key, %actor, "platform setting changed");
        self.refresh(client).await?;
        Ok(key)
    }

    /// A fresh random deploy key (64 hex characters), for rotation from the console; the
    /// caller shows it once and stores it with [`Settings::update`].
    pub fn generate_deploy_key() -> Secret {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Secret::new(hex::encode(bytes))
    }
}

fn apply(settings: &mut PlatformSettings, key: SettingKey, value: &serde_json::Value) {
    match key {
        SettingKey::DeploymentUrl => {
            if let Some(s) = value.as_str() {
                settings.deployment_url = s.to_string();
            }
        }
        SettingKey::DeployKey => {
            if let Some(s) = value.as_str() {
                settings.deploy_key_sha256 = s.to_string();
            }
        }
        SettingKey::EnableRealtime => {
            if let Some(b) = value.as_bool() {
                settings.enable_realtime = b;
            }
        }
        SettingKey::SyncIntervalMs => {
            if let Some(n) = value.as_u64() {
                settings.sync_interval_ms = n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> PlatformDefaults {
        PlatformDefaults {
            deployment_url: "http://localhost:8080".into(),
            deploy_key: Secret::new("d".repeat(40)),
            enable_realtime: true,
            sync_interval_ms: 5000,
        }
    }

    #[test]
    fn validation_names_what_is_expected() {
        assert!(validate(SettingKey::DeploymentUrl, "https://rt.example.org").is_ok());
        assert!(validate(SettingKey::DeploymentUrl, "ftp://x").is_err());
        assert!(validate(SettingKey::DeployKey, "short").is_err());
        assert!(validate(SettingKey::DeployKey, &"x".repeat(31)).is_err());
        assert_eq!(validate(SettingKey::EnableRealtime, "off").unwrap(), json!(false));
        assert!(validate(SettingKey::SyncIntervalMs, "50").is_err());
        assert_eq!(validate(SettingKey::SyncIntervalMs, "250").unwrap(), json!(250));
        let err = validate(SettingKey::SyncIntervalMs, "soon")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sync_interval_ms") && err.contains("milliseconds"),
            "{err}"
        );
    }

    #[test]
    fn the_deploy_key_is_kept_as_a_digest_only() {
        let stored = validate(SettingKey::DeployKey, &"s".repeat(40)).unwrap();
        assert_eq!(stored, json!(digest_key(&"s".repeat(40))));
        let s = Settings::new(&defaults());
        assert!(s.deploy_key_matches(&"d".repeat(40)));
        assert!(!s.deploy_key_matches(&"d".repeat(39)));
        assert!(!format!("{:?}", s.current()).contains(&digest_key(&"d".repeat(40))));
        let listed = s.list();
        assert_eq!(listed[1].shown, "***");
    }

    #[test]
    fn an_unset_deploy_key_matches_nothing() {
        let mut d = defaults();
        d.deploy_key = Secret::default();
        let s = Settings::new(&d);
        assert!(!s.deploy_key_matches(""));
        assert_eq!(s.list()[1].shown, "(not set)");
    }

    #[test]
    fn generated_keys_are_valid_and_distinct() {
        let a = Settings::generate_deploy_key();
        let b = Settings::generate_deploy_key();
        assert_ne!(a.expose(), b.expose());
        assert!(validate(SettingKey::DeployKey, a.expose()).is_ok());
    }
}
