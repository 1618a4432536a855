//! The benchmarks' WebSocket clients.

use anyhow::Result;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A client connection.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects like a browser would, without tungstenite's default 128 KiB read buffer:
/// tungstenite zeroes the free part of it before every read, which with a thousand
/// clients on this machine cost the benchmark a sixth of both cores in `memset`, time
/// taken from pulsed. 4 KiB, as pulsed reads its clients; a longer frame takes more reads.
pub async fn connect(url: &str) -> Result<Ws> {
    let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), false).await?;
    Ok(ws)
}
