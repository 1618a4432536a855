//! Frames of the client protocol: JSON text frames over WebSocket, one protocol for
//! browsers and for `pulsetop` (over the admin Unix socket or TCP).
//!
//! Every frame is a JSON object with a `type` field. The first client frame must be
//! `hello`, naming the protocol version; the server answers `welcome` or an `error`
//! followed by a close.

use serde::{Deserialize, Serialize};

use crate::admin::{AdminRequest, AdminResponse};
use crate::error::ErrorBody;

/// The protocol version this build speaks. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Opens the session. Browsers send a JWT; services and the console over TCP send the
    /// deploy key; the console over the Unix socket sends neither (the socket's file mode
    /// is the credential).
    Hello {
        /// The protocol version the client speaks.
        protocol: u32,
        /// A JWT issued by Symfony.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// The deploy key, for services.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deploy_key: Option<String>,
    },
    /// A fresh JWT for a live session, sent before the old one expires.
    Token {
        /// The new token.
        token: String,
    },
    /// Liveness probe; answered with `pong`.
    Ping {
        /// Echoed back.
        #[serde(default)]
        nonce: u64,
    },
    /// A console request (needs the console capability unless stated otherwise).
    Admin {
        /// Correlates the response.
        id: String,
        /// What is asked.
        request: AdminRequest,
    },
}

/// A frame sent by the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The session is open.
    Welcome {
        /// The protocol version the server speaks.
        protocol: u32,
        /// The server's build version.
        server_version: String,
        /// A session id, for logs and support.
        session: String,
        /// Roles the session holds, by wire name.
        roles: Vec<String>,
        /// Whether real-time updates are on; when off, clients poll every
        /// `sync_interval_ms` over HTTP.
        realtime: bool,
        /// The polling interval, from the platform settings.
        sync_interval_ms: u64,
    },
    /// Answers `ping`.
    Pong {
        /// The client's nonce.
        nonce: u64,
    },
    /// An error. `id` names the request it answers, when it answers one.
    Error {
        /// The request id, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The error.
        #[serde(flatten)]
        error: ErrorBody,
    },
    /// Answers an `admin` request.
    Admin {
        /// The request id.
        id: String,
        /// The answer.
        response: Box<AdminResponse>,
    },
}

/// Parses a client frame, turning every failure into an `invalid_argument` error body that
/// says what was wrong, so the connection can answer it and stay up.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, ErrorBody> {
    serde_json::from_str(text).map_err(|e| {
        ErrorBody::new(
            crate::error::ErrorCode::InvalidArgument,
            format!("malformed frame: {e}; every frame is a JSON object with a \"type\" field"),
        )
        .with_details(serde_json::json!({ "line": e.line(), "column": e.column() }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn hello_round_trips() {
        let frame = ClientFrame::Hello {
            protocol: PROTOCOL_VERSION,
            token: Some("a.b.c".into()),
            deploy_key: None,
        };
        let text = serde_json::to_string(&frame).unwrap();
        assert_eq!(text, r#"{"type":"hello","protocol":1,"token":"a.b.c"}"#);
        assert_eq!(parse_client_frame(&text).unwrap(), frame);
    }

    #[test]
    fn error_frame_is_flat() {
        let frame = ServerFrame::Error {
            id: Some("7".into()),
            error: ErrorBody::new(ErrorCode::Forbidden, "no"),
        };
        assert_eq!(
            serde_json::to_string(&frame).unwrap(),
            r#"{"type":"error","id":"7","code":"forbidden","message":"no"}"#
        );
    }

    #[test]
    fn malformed_frames_become_invalid_argument() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"type":"nope"}"#,
            r#"{"type":"hello"}"#,
            "\u{0}",
        ] {
            let err = parse_client_frame(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{bad:?}");
        }
    }
}
