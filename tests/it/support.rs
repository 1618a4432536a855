//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, ExchangeKind};
use pulse_harness::{PgCluster, Pulsed, Rabbit, TestDb, wait_for};
use pulse_shared::protocol::{ClientFrame, PROTOCOL_VERSION, ServerFrame};
use serde_json::Value;
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

    /// Connects and says hello with the socket's trust (no token, no key); returns once
    /// pulsed has welcomed the session.
    pub async fn welcomed(socket: &Path) -> anyhow::Result<AdminClient> {
        let mut c = AdminClient::connect(socket).await?;
        c.send(&ClientFrame::Hello {
            protocol: PROTOCOL_VERSION,
            token: None,
            deploy_key: None,
        })
        .await?;
        match c.recv().await? {
            ServerFrame::Welcome { .. } => Ok(c),
            other => anyhow::bail!("expected a welcome, got {other:?}"),
        }
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

/// pulsed in-process (`pulse_daemon::run`) on port 0, without a metrics listener.
pub struct InProcess {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), pulse_daemon::StartError>>,
    /// The HTTP base URL.
    pub base: String,
    _dir: tempfile::TempDir,
}

impl InProcess {
    /// Starts with `env` as its environment; returns at once, ready or not.
    pub async fn start(env: &[(&str, String)]) -> InProcess {
        let mut pairs: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        pairs.push(("PULSE__METRICS__LISTEN".into(), String::new()));
        let config = pulse_daemon::config::Config::load(&pulse_daemon::config::ConfigSource {
            file: None,
            env: pairs,
        })
        .expect("valid test config");
        let dir = tempfile::tempdir().unwrap();
        let listeners = pulse_daemon::Listeners {
            http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            metrics: None,
            admin: pulse_daemon::bind_admin_socket(&dir.path().join("a.sock"), 0o600).unwrap(),
        };
        let base = format!("http://{}", listeners.http.local_addr().unwrap());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (control, _reload) = pulse_daemon::Control::new(shutdown.clone());
        let task = tokio::spawn(pulse_daemon::run(config, listeners, control));
        InProcess {
            shutdown,
            task,
            base,
            _dir: dir,
        }
    }

    /// The state of the `replication` component in `/readyz`.
    pub async fn replication_state(&self) -> Option<String> {
        let (_, body) = readyz(&self.base).await?;
        let state = &component(&body, "replication")?["state"];
        Some(state.as_str().unwrap_or("").to_string())
    }

    /// Cancels its shutdown token and waits for `run` to return well.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("pulsed stops within 20 s")
            .unwrap()
            .unwrap();
    }
}

/// A fresh database of the shared cluster with `sql` run in it, and a connection to it.
pub async fn fresh_db_with(label: &str, sql: &str) -> (TestDb, tokio_postgres::Client) {
    let db = PgCluster::shared().fresh_db(label).await.unwrap();
    let c = db.connect().await.unwrap();
    c.batch_execute(sql).await.unwrap();
    (db, c)
}

/// The first column of every row `sql` returns.
pub async fn column<T>(client: &tokio_postgres::Client, sql: &str) -> Vec<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The first two columns of every row `sql` returns.
pub async fn pairs<A, B>(client: &tokio_postgres::Client, sql: &str) -> Vec<(A, B)>
where
    A: for<'a> tokio_postgres::types::FromSql<'a>,
    B: for<'a> tokio_postgres::types::FromSql<'a>,
{
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// pulsed's `/readyz` at `http` (its base URL): the status and the body, or `None` while
/// it does not answer.
pub async fn readyz(http: &str) -> Option<(u16, Value)> {
    let r = reqwest::get(format!("{http}/readyz")).await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.ok()?))
}

/// The component `name` of a `/readyz` body.
pub fn component<'a>(readyz: &'a Value, name: &str) -> Option<&'a Value> {
    readyz["components"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

/// pulsed's Prometheus metrics, as text.
pub async fn metrics_text(pulsed: &Pulsed) -> String {
    reqwest::get(format!("{}/metrics", pulsed.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Waits until pulsed's change stream is up (`replication` up in `/readyz`: the snapshot
/// is loaded and streaming runs); fails with pulsed's log.
pub async fn wait_streaming(pulsed: &Pulsed, timeout: Duration) {
    wait_for("replication up", timeout, || async {
        let (_, body) = readyz(&pulsed.http).await?;
        (component(&body, "replication")?["state"] == "up").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", pulsed.log()));
}

/// Waits until pulsed has processed the command `command_id` (its row in
/// `pulse.processed_commands`); its outcome. Fails with pulsed's log.
pub async fn wait_processed(state: &tokio_postgres::Client, command_id: &str, pulsed: &Pulsed) -> String {
    wait_for(
        &format!("command {command_id}"),
        Duration::from_secs(20),
        || async {
            state
                .query_opt(
                    "SELECT outcome FROM pulse.processed_commands WHERE command_id = $1",
                    &[&command_id],
                )
                .await
                .ok()
                .flatten()
                .map(|r| r.get(0))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", pulsed.log()))
}

/// Uniquely named broker objects of one test, deleted at the end.
pub struct Names {
    pub exchange: String,
    pub commands: String,
    pub dead: String,
    /// The test's own queue, bound to the events exchange.
    pub tap: String,
}

impl Names {
    pub fn new(label: &str) -> Names {
        Names {
            exchange: Rabbit::unique(&format!("{label}-x")),
            commands: Rabbit::unique(&format!("{label}-cmd")),
            dead: Rabbit::unique(&format!("{label}-dead")),
            tap: Rabbit::unique(&format!("{label}-tap")),
        }
    }

    /// pulsed's environment for these names: the source database and the broker.
    pub fn env(&self, db: &TestDb, amqp_url: &str) -> Vec<(&'static str, String)> {
        vec![
            ("PULSE__SOURCE__URL", db.url()),
            ("PULSE__AMQP__URL", amqp_url.to_string()),
            ("PULSE__AMQP__EXCHANGE", self.exchange.clone()),
            ("PULSE__AMQP__COMMANDS_QUEUE", self.commands.clone()),
            ("PULSE__AMQP__COMMANDS_DEAD_LETTER_QUEUE", self.dead.clone()),
            ("PULSE__AMQP__RETRY_MAX_MS", "1000".into()),
            ("PULSE__AMQP__RETRY_BASE_MS", "50".into()),
            ("PULSE__JOBS__ENABLED", "false".into()),
        ]
    }

    pub async fn cleanup(&self, channel: &lapin::Channel) {
        for q in [&self.commands, &self.dead, &self.tap] {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = channel
            .exchange_delete(self.exchange.as_str().into(), Default::default())
            .await;
    }
}

/// One test's broker: the real RabbitMQ, a connection, a channel, and the test's
/// uniquely named objects.
pub struct Broker {
    pub rabbit: Rabbit,
    pub conn: lapin::Connection,
    pub channel: lapin::Channel,
    pub names: Names,
}

impl Broker {
    /// Connects; declares nothing yet.
    pub async fn new(label: &str) -> Broker {
        let rabbit = Rabbit::from_env();
        let conn = rabbit.connect().await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        Broker {
            rabbit,
            conn,
            channel,
            names: Names::new(label),
        }
    }

    /// The test's queue bound to the events exchange with `binding` ([`tap`]), and every
    /// delivery on it recorded in the background ([`collect`]).
    pub async fn record(&self, binding: &str) -> Arc<Mutex<Vec<Seen>>> {
        tap(&self.channel, &self.names, binding).await;
        collect(self.conn.create_channel().await.unwrap(), self.names.tap.clone())
    }

    /// Waits until pulsed has declared its commands queue (a command published earlier
    /// would be dropped).
    pub async fn wait_commands_queue(&self) {
        wait_for("the commands queue", Duration::from_secs(20), || async {
            // A failed passive declare closes its channel: a fresh one each time.
            let probe = self.conn.create_channel().await.ok()?;
            probe
                .queue_declare(
                    self.names.commands.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .ok()
        })
        .await
        .unwrap();
    }

    /// Publishes a command to pulsed's commands queue as Symfony Messenger does (the
    /// class in the `type` header, see [`command_properties`]).
    pub async fn send_command(&self, class: Option<&str>, body: &Value) {
        self.channel
            .basic_publish(
                "".into(),
                self.names.commands.as_str().into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                command_properties(class),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Deletes the test's broker objects.
    pub async fn cleanup(&self) {
        self.names.cleanup(&self.channel).await;
    }
}

/// Declares the events exchange as pulsed does, and the test's queue bound to it.
pub async fn tap(channel: &lapin::Channel, names: &Names, binding: &str) {
    channel
        .exchange_declare(
            names.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            names.tap.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            names.tap.as_str().into(),
            names.exchange.as_str().into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// One delivery seen by the test's consumer.
#[derive(Debug, Clone)]
pub struct Seen {
    pub message_id: String,
    pub routing_key: String,
    pub body: Value,
    pub class: Option<String>,
    pub content_type: Option<String>,
    pub persistent: bool,
}

/// Consumes a queue in the background, recording every delivery.
pub fn collect(channel: lapin::Channel, queue: String) -> Arc<Mutex<Vec<Seen>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "test-tap".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        while let Some(Ok(d)) = consumer.next().await {
            out.lock().unwrap().push(Seen {
                message_id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                routing_key: d.routing_key.to_string(),
                body: serde_json::from_slice(&d.data).unwrap_or(Value::Null),
                class: header_text(&d.properties, "type"),
                content_type: d.properties.content_type().as_ref().map(|s| s.to_string()),
                persistent: d.properties.delivery_mode() == &Some(2),
            });
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    });
    seen
}

/// A text header of a message (`type`, `x-pulse-reason`), if it has one.
pub fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// The properties of a command as Symfony Messenger sends it: JSON, the class in the
/// `type` header (`None`: no such header), and a stamp header pulsed does not know.
pub fn command_properties(class: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(class) = class {
        headers.insert(
            ShortString::from("type"),
            AMQPValue::LongString(LongString::from(class)),
        );
    }
    // A stamp header pulsed knows nothing about: ignored.
    headers.insert(
        ShortString::from("X-Message-Stamp-App\\Stamp\\TraceStamp"),
        AMQPValue::LongString(LongString::from("[{\"traceId\":\"abc\"}]")),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers)
}
