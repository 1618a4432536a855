//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pulse_shared::protocol::{ClientFrame, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

/// The pulsed binary built for these tests.
pub fn pulsed_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pulsed"))
}

/// A WebSocket session over the admin Unix socket.
pub struct AdminClient {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::UnixStream>,
}

impl AdminClient {
    /// Connects and sends nothing yet.
    pub async fn connect(socket: &Path) -> anyhow::Result<AdminClient> {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        let (ws, _) = tokio_tungstenite::client_async("ws://localhost/ws", stream).await?;
        Ok(AdminClient { ws })
    }

    /// Sends a frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> anyhow::Result<()> {
        self.ws
            .send(Message::Text(serde_json::to_string(frame)?.into()))
            .await?;
        Ok(())
    }

    /// Sends raw text.
    pub async fn send_raw(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.to_string().into())).await?;
        Ok(())
    }

    /// The next frame, within 5 s.
    pub async fn recv(&mut self) -> anyhow::Result<ServerFrame> {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("connection closed"))??;
            if let Message::Text(t) = msg {
                return Ok(serde_json::from_str(&t)?);
            }
        }
    }
}
