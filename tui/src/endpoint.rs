//! Where pulsetop connects: pulsed's admin Unix socket (the default) or a WebSocket URL
//! with the deploy key.

use std::path::PathBuf;

/// A console endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The admin socket; its file mode is the credential.
    Unix(PathBuf),
    /// `ws://host:port/path`; `hello` carries the deploy key.
    Tcp {
        /// `host:port`, what the TCP connection dials.
        authority: String,
        /// The whole URL, for the WebSocket handshake.
        url: String,
    },
}

impl Endpoint {
    /// Parses a `ws://` URL. `wss://` is refused: this build has no TLS, so it would send
    /// the deploy key in clear; put pulsed behind an SSH tunnel instead.
    pub fn from_url(url: &str) -> Result<Endpoint, String> {
        if url.starts_with("wss://") {
            return Err(
                "wss:// is not supported by this build; use ws:// over an SSH tunnel or the admin socket"
                    .into(),
            );
        }
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url:?} is not a ws:// URL (expected ws://host:port/ws)"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() {
            return Err(format!("{url:?} names no host (expected ws://host:port/ws)"));
        }
        let authority = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Endpoint::Tcp {
            authority,
            url: url.to_string(),
        })
    }

    /// How the status bar names it.
    pub fn describe(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
            Endpoint::Tcp { url, .. } => url.clone(),
        }
    }
}

pub use pulse_shared::admin::default_admin_socket;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_an_authority() {
        assert_eq!(
            Endpoint::from_url("ws://10.0.0.2:8080/ws").unwrap(),
            Endpoint::Tcp {
                authority: "10.0.0.2:8080".into(),
                url: "ws://10.0.0.2:8080/ws".into()
            }
        );
        assert!(matches!(
            Endpoint::from_url("ws://pulse/ws").unwrap(),
            Endpoint::Tcp { authority, .. } if authority == "pulse:80"
        ));
        assert!(
            Endpoint::from_url("wss://x/ws")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(Endpoint::from_url("http://x/ws").is_err());
        assert!(Endpoint::from_url("ws:///ws").is_err());
    }

    #[test]
    fn the_default_socket_ends_in_admin_sock() {
        assert!(default_admin_socket().ends_with("admin.sock"));
    }
}
