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
    /// Starts a live query: a live table by its schema name, `metric:<name>`, `presence`
    /// or `notifications`. Answered with `result`, then `update` / `value` / `presence`
    /// frames carrying the same id.
    Subscribe {
        /// Chosen by the client; names the subscription in every later frame.
        id: String,
        /// What to watch.
        query: String,
        /// Arguments: equality filters for live tables (`{"status": "active"}`), `tenant`
        /// for services and platform admins, `resource` for presence.
        #[serde(default)]
        args: serde_json::Value,
    },
    /// Ends a subscription.
    Unsubscribe {
        /// The subscription id.
        id: String,
    },
    /// After a reconnect: re-opens subscriptions and asks for what was missed since
    /// `cursor` (the last cursor the client saw). Each subscription gets exactly the missed
    /// updates, or `resnapshot` then a fresh `result` when the history no longer reaches back.
    Resume {
        /// The last cursor seen.
        cursor: String,
        /// The subscriptions to re-open.
        subscriptions: Vec<SubscribeSpec>,
    },
    /// Calls a mutation: `notify`, `mark_read`, `mark_all_read`, or one declared in the
    /// schema file. Answered with `mutation_result` or an error with the same id.
    Mutate {
        /// Correlates the answer.
        id: String,
        /// The mutation.
        name: String,
        /// Its arguments.
        #[serde(default)]
        args: serde_json::Value,
        /// For mutations declared in the schema file: a key the client picks once per
        /// intended action (1 to 128 visible ASCII characters) and sends again when it
        /// retries, say after a reconnect. The same key from the same user with the same
        /// mutation and arguments is answered with the first call's `message_id` and
        /// `duplicate: true`, and nothing is sent to Symfony twice; the same key with
        /// different arguments is refused (`invalid_argument`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
    },
    /// Presence: "I am here, looking at `resource`". Repeat within the presence TTL.
    Heartbeat {
        /// The page or record being viewed.
        resource: String,
        /// A small state (typing, cursor position…), at most 1 KB of JSON.
        #[serde(default)]
        state: serde_json::Value,
    },
    /// A console request (needs the console capability unless stated otherwise).
    Admin {
        /// Correlates the response.
        id: String,
        /// What is asked.
        request: AdminRequest,
    },
}

/// One subscription inside `resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscribeSpec {
    /// The subscription id.
    pub id: String,
    /// What to watch.
    pub query: String,
    /// Its arguments.
    #[serde(default)]
    pub args: serde_json::Value,
}

/// What happened to a row of a live table (or an inbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateOp {
    /// A row entered the result (new, or moved into the filter).
    Insert,
    /// A row in the result changed.
    Update,
    /// A row left the result (deleted, or moved out of the filter).
    Delete,
}

/// A presence event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceEvent {
    /// The user came online (or into the watched resource).
    Join,
    /// The user's resource or state changed.
    Update,
    /// The user went offline (or left the watched resource).
    Leave,
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
    /// The platform settings changed while connected: when `realtime` turns false the
    /// client switches to polling every `sync_interval_ms` over HTTP.
    Settings {
        /// Enable Real-time.
        realtime: bool,
        /// Sync Interval, in ms.
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
    /// The initial result of a subscription. `data` is an array of rows for live tables,
    /// `{"value": …}` for metrics, `{"online": […]}` for presence, `{"items": […],
    /// "unread": n}` for notifications.
    Result {
        /// The subscription id.
        id: String,
        /// Position in the update stream this result is valid at.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<String>,
        /// The rows or value.
        data: serde_json::Value,
    },
    /// A change to a subscribed live table or inbox.
    Update {
        /// The subscription id.
        id: String,
        /// Position of this update; send the last one seen in `resume`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<String>,
        /// What happened.
        op: UpdateOp,
        /// The row's primary key, as an object.
        key: serde_json::Value,
        /// The row's visible columns (absent on delete).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        row: Option<serde_json::Value>,
    },
    /// Several live-table `update` frames in one WebSocket frame, in the order they
    /// happened (the server coalesces updates that are ready together, e.g. one engine
    /// batch, to save frames under load). Each item is a complete `update` frame with its
    /// own subscription id and cursor: handle them one by one, exactly as if they had come
    /// separately; the last item's cursor is the one to keep for `resume`.
    Updates {
        /// The `update` frames.
        updates: Vec<ServerFrame>,
    },
    /// A new value of a metric or of an unread count.
    Value {
        /// The subscription id.
        id: String,
        /// What changed (`value`, `unread`).
        name: String,
        /// The value.
        value: serde_json::Value,
    },
    /// The history no longer reaches back to the client's cursor: drop the local copy; a
    /// fresh `result` follows.
    Resnapshot {
        /// The subscription id.
        id: String,
    },
    /// A subscription ended at the client's request.
    Unsubscribed {
        /// The subscription id.
        id: String,
    },
    /// Answers `mutate`.
    MutationResult {
        /// The request id.
        id: String,
        /// What the mutation returned.
        result: serde_json::Value,
    },
    /// Someone joined, moved or left.
    Presence {
        /// The presence subscription id.
        id: String,
        /// What happened.
        event: PresenceEvent,
        /// Who.
        user: String,
        /// Where they are (on leave: where they were).
        resource: String,
        /// Their state.
        #[serde(default)]
        state: serde_json::Value,
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
    fn engine_frames_round_trip() {
        let text = r#"{"type":"subscribe","id":"s1","query":"members","args":{"status":"active"}}"#;
        match parse_client_frame(text).unwrap() {
            ClientFrame::Subscribe { id, query, args } => {
                assert_eq!((id.as_str(), query.as_str()), ("s1", "members"));
                assert_eq!(args["status"], "active");
            }
            other => panic!("{other:?}"),
        }
        let hb = parse_client_frame(r#"{"type":"heartbeat","resource":"/members/7"}"#).unwrap();
        assert!(matches!(hb, ClientFrame::Heartbeat { state, .. } if state.is_null()));
        let up = ServerFrame::Update {
            id: "s1".into(),
            cursor: Some("a-1".into()),
            op: UpdateOp::Delete,
            key: serde_json::json!({"id": 1}),
            row: None,
        };
        assert_eq!(
            serde_json::to_string(&up).unwrap(),
            r#"{"type":"update","id":"s1","cursor":"a-1","op":"delete","key":{"id":1}}"#
        );
    }

    #[test]
    fn updates_frame_carries_whole_update_frames() {
        let one = |n: u64| ServerFrame::Update {
            id: "s1".into(),
            cursor: Some(format!("a-{n}")),
            op: UpdateOp::Insert,
            key: serde_json::json!({ "id": n }),
            row: Some(serde_json::json!({ "id": n })),
        };
        let frame = ServerFrame::Updates {
            updates: vec![one(1), one(2)],
        };
        let text = serde_json::to_string(&frame).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"type":"updates","updates":["#,
                r#"{"type":"update","id":"s1","cursor":"a-1","op":"insert","key":{"id":1},"row":{"id":1}},"#,
                r#"{"type":"update","id":"s1","cursor":"a-2","op":"insert","key":{"id":2},"row":{"id":2}}]}"#
            )
        );
        assert_eq!(serde_json::from_str::<ServerFrame>(&text).unwrap(), frame);
    }

    #[test]
    fn malformed_frames_become_invalid_argument() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"type":"nope"}"#,
            r#"{"type":"hello"}"#,
            r#"{"type":"subscribe","query":"x"}"#,
            r#"{"type":"heartbeat"}"#,
            r#"{"type":"resume","cursor":"x"}"#,
            "\u{0}",
        ] {
            let err = parse_client_frame(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{bad:?}");
        }
    }
}
