//! The broker side of Pulse: one supervised RabbitMQ connection per instance, the outbox
//! relay that publishes webhooks over it, and the command consumer (in [`crate::commands`])
//! that it hosts.
//!
//! The supervisor owns the connection and every channel and consumer on it. It does not
//! use the client library's own recovery: a failure anywhere (connection, channel,
//! consumer, a publish) ends the session, health `broker` turns Degraded with the reason,
//! and a new session is built from scratch after a capped backoff. Meanwhile nothing else
//! in pulsed waits for the broker: the outbox keeps growing in PostgreSQL and drains when
//! the broker returns.
//!
//! The relay publishes with publisher confirms, persistent delivery and `mandatory`
//! (a returned message is a failure), in outbox order. Only one instance relays at a
//! time (a PostgreSQL advisory lock held for the session), so events of one aggregate
//! leave in the order they were enqueued. A row is marked delivered only after the broker
//! confirmed it; a crash or an outage between the publish and that mark sends it again
//! with the same `message_id` (at least once), and since the relay always restarts from
//! the oldest undelivered row, the first copies still arrive in order. Returned or nacked
//! events are retried with capped exponential backoff and move to `pulse.outbox_dead`
//! after `amqp.max_attempts` failures; while one waits for its retry, no newer event of its
//! aggregate is sent. The one exception to the order: newer events of the same aggregate
//! that were already in flight when the broker returned or nacked an older one are not
//! recalled. At most two batches (of `amqp.publish_batch`) are in flight: while the
//! broker confirms one and its progress is recorded, the next is read and sent, so the
//! database round trips overlap with the broker's.
//!
//! This module never writes to the outbox except to mark progress, never decides what an
//! event says, and never acknowledges a command (that is [`crate::commands`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use pulse_shared::admin::HealthState;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::commands::{self, CommandEffects};
use crate::config::{AmqpConfig, DbUrl};
use crate::health::Health;
use crate::outbox::{EventCatalog, NOTIFY_CHANNEL};

/// Advisory lock key of the relay: one instance publishes at a time.
const RELAY_LOCK_KEY: i64 = 0x7075_6c73_655f_726c;

/// How often a standby instance tries to become the relay.
const STANDBY_RETRY: Duration = Duration::from_secs(2);

/// Longest wait for the confirms of one batch before the session is given up.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait for new events before the outbox is read again anyway (a missed NOTIFY,
/// a retry coming due).
const IDLE_POLL: Duration = Duration::from_millis(250);

/// Everything the broker side needs, shared by its tasks.
pub struct Broker {
    /// The `amqp.*` settings.
    pub config: AmqpConfig,
    /// Event names to PHP classes.
    pub catalog: EventCatalog,
    /// The state database pool.
    pub pool: deadpool_postgres::Pool,
    /// The state database, for the relay's own session (lock and LISTEN).
    pub state_db: DbUrl,
    /// Where the `broker` component reports.
    pub health: Arc<Health>,
    /// What commands do.
    pub effects: Arc<dyn CommandEffects>,
}

/// Why a broker session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The broker or the network failed.
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    /// The broker confirmed nothing for too long.
    #[error("no publisher confirm within {0:?}")]
    NoConfirm(Duration),
    /// The topology pulsed expects is missing (passive declare failed).
    #[error("{what} {name:?} does not exist and amqp.declare_topology is false: {source}")]
    Topology {
        /// exchange or queue.
        what: &'static str,
        /// Its name.
        name: String,
        /// The broker's answer.
        source: lapin::Error,
    },
}

/// Registers the help text of the broker-side metrics.
fn describe_metrics() {
    metrics::describe_gauge!(
        "pulse_outbox_depth",
        "Outbox events not yet delivered to RabbitMQ."
    );
    metrics::describe_gauge!(
        "pulse_outbox_oldest_pending_seconds",
        "Age of the oldest undelivered outbox event, in seconds (0 when none)."
    );
    metrics::describe_gauge!("pulse_outbox_dead_letters", "Events in pulse.outbox_dead.");
    metrics::describe_counter!(
        "pulse_outbox_published_total",
        "Events published and confirmed by the broker (its rate is the publish rate)."
    );
    metrics::describe_histogram!(
        "pulse_outbox_confirm_seconds",
        "Time from a relay batch's first publish to its last confirm, in seconds."
    );
    metrics::describe_counter!(
        "pulse_outbox_publish_failures_total",
        "Publishes returned (unroutable) or nacked by the broker."
    );
    metrics::describe_counter!(
        "pulse_outbox_dead_letters_total",
        "Events moved to the dead-letter table after amqp.max_attempts failures."
    );
    metrics::describe_counter!(
        "pulse_commands_total",
        "Commands from Symfony, by kind and outcome (applied, duplicate, dead_lettered, requeued)."
    );
}

/// Runs the supervisor until `shutdown`: connect, declare, relay and consume; on any
/// failure, report Degraded, back off (capped) and start over.
pub async fn supervise(broker: Arc<Broker>, shutdown: CancellationToken) {
    describe_metrics();
    let stats = tokio::spawn(stats_loop(broker.clone(), shutdown.clone()));
    let mut delay = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        let url = broker.config.url.expose().to_string();
        let props = ConnectionProperties::default().with_connection_name("pulsed".into());
        let connect = tokio::time::timeout(Duration::from_secs(10), Connection::connect(&url, props));
        let outcome = tokio::select! {
            c = connect => c,
            _ = shutdown.cancelled() => break,
        };
        match outcome {
            Ok(Ok(conn)) => {
                let started = Instant::now();
                broker.health.set("broker", HealthState::Up, "connected", false);
                let result = session(&broker, &conn, &shutdown).await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    conn.close(200, "pulsed session ends".into()),
                )
                .await;
                match result {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "broker session ended; reconnecting");
                        broker.health.set(
                            "broker",
                            HealthState::Degraded,
                            format!("broker session failed: {e}; events wait in the outbox"),
                            false,
                        );
                    }
                }
                // A session that lasted a while starts the backoff afresh.
                if started.elapsed() > Duration::from_secs(30) {
                    delay = Duration::from_millis(200);
                }
            }
            Ok(Err(e)) => broker.health.set(
                "broker",
                HealthState::Degraded,
                format!(
                    "cannot connect to RabbitMQ at {}: {e}; events wait in the outbox",
                    crate::config::mask_url_password(&url)
                ),
                false,
            ),
            Err(_) => broker.health.set(
                "broker",
                HealthState::Degraded,
                "RabbitMQ did not answer within 10 s; events wait in the outbox",
                false,
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
        delay = (delay * 2).min(broker.config.retry_max);
    }
    stats.abort();
    broker.health.set("broker", HealthState::Down, "stopped", false);
}

/// One connected session: declare, then relay and consume until something fails or
/// shutdown. Returns Ok only on shutdown.
async fn session(
    broker: &Arc<Broker>,
    conn: &Connection,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let mut events = conn.events_listener();
    let topology = conn.create_channel().await?;
    declare_topology(&broker.config, &topology).await?;
    // A failed passive declare closes its channel; a fresh one for publishing.
    let publisher = conn.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    let _ = topology.close(200, "declared".into()).await;

    let session_end = shutdown.child_token();
    let relay = relay_loop(broker, &publisher, &session_end);
    let consume = async {
        match &broker.config.commands_queue {
            Some(queue) => {
                commands::consume(
                    &commands::Consumer {
                        pool: &broker.pool,
                        effects: broker.effects.as_ref(),
                        queue,
                        dead_letter_queue: &broker.config.commands_dead_letter_queue,
                        prefetch: broker.config.commands_prefetch,
                    },
                    conn,
                    &session_end,
                )
                .await
            }
            None => {
                session_end.cancelled().await;
                Ok(())
            }
        }
    };
    let watch = async {
        while let Some(event) = events.next().await {
            match event {
                lapin::Event::Error(e) => return Err(SessionError::Amqp(e)),
                // A resource alarm (memory, disk): publishes wait; say so.
                lapin::Event::ConnectionBlocked(reason) => broker.health.set(
                    "broker",
                    HealthState::Degraded,
                    format!("RabbitMQ blocks publishing ({reason}); events wait in the outbox"),
                    false,
                ),
                lapin::Event::ConnectionUnblocked => {
                    broker
                        .health
                        .set("broker", HealthState::Up, "connected; publishing again", false)
                }
                _ => {}
            }
        }
        session_end.cancelled().await;
        Ok(())
    };
    let result = tokio::select! {
        r = relay => r,
        r = consume => r.map_err(SessionError::Amqp),
        r = watch => r,
    };
    session_end.cancel();
    result
}

/// Declares (or, when Symfony owns the topology, checks) the exchange, the command queue
/// and its dead-letter queue.
async fn declare_topology(config: &AmqpConfig, channel: &lapin::Channel) -> Result<(), SessionError> {
    let passive = !config.declare_topology;
    channel
        .exchange_declare(
            config.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive,
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| SessionError::Topology {
            what: "exchange",
            name: config.exchange.clone(),
            source,
        })?;
    let queues = config
        .commands_queue
        .iter()
        .chain(std::iter::once(&config.commands_dead_letter_queue));
    for queue in queues {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive,
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|source| SessionError::Topology {
                what: "queue",
                name: queue.clone(),
                source,
            })?;
    }
    Ok(())
}

/// The relay's own database session: holds the advisory lock and LISTENs for new events.
struct Leader {
    client: tokio_postgres::Client,
    wake: Arc<Notify>,
    /// Cancelled when the session's connection ends.
    lost: CancellationToken,
}

impl Leader {
    /// Tries once to become the relay.
    async fn acquire(url: &DbUrl) -> Result<Option<Leader>, tokio_postgres::Error> {
        let (client, mut connection) = url.config().connect(url.connector()).await?;
        let wake = Arc::new(Notify::new());
        let lost = CancellationToken::new();
        {
            let wake = wake.clone();
            let lost = lost.clone();
            tokio::spawn(async move {
                let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "relay database session ended");
                            break;
                        }
                    }
                }
                lost.cancel();
            });
        }
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&RELAY_LOCK_KEY])
            .await?
            .get(0);
        if !locked {
            return Ok(None);
        }
        // The outbox is read oldest first, a batch at a time: walking the pending index
        // in id order is the plan. Right after a burst (before autovacuum has analyzed
        // the table) the planner believes the outbox nearly empty and sorts every pending
        // row instead, rendering each payload as text on the way: 100 ms per batch at
        // 100,000 pending, against 1 ms. This session runs only the relay's queries.
        client
            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}; SET enable_sort = off"))
            .await?;
        Ok(Some(Leader { client, wake, lost }))
    }
}

/// A pending outbox row, ready to publish.
struct Pending {
    id: i64,
    message_id: String,
    aggregate: String,
    event: String,
    body: String,
    attempts: i32,
}

/// What became of one publish.
enum Outcome {
    Delivered,
    /// Not published: the schema file does not send this event (a row written before it
    /// was switched off).
    Skipped,
    /// Returned or nacked: retried later, dead-lettered after max_attempts.
    Failed(String),
}

/// Becomes the relay (or waits as a standby), then publishes the outbox until the session
/// ends. Returns Err on a broker failure; database trouble is waited out here.
async fn relay_loop(
    broker: &Arc<Broker>,
    channel: &lapin::Channel,
    session_end: &CancellationToken,
) -> Result<(), SessionError> {
    'leadership: loop {
        let leader = match Leader::acquire(&broker.state_db).await {
            Ok(Some(l)) => l,
            Ok(None) => {
                broker.health.set(
                    "broker",
                    HealthState::Up,
                    "connected; standby relay (another instance publishes the outbox)",
                    false,
                );
                tokio::select! {
                    _ = tokio::time::sleep(STANDBY_RETRY) => continue 'leadership,
                    _ = session_end.cancelled() => return Ok(()),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "relay cannot reach the state database; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(STANDBY_RETRY) => continue 'leadership,
                    _ = session_end.cancelled() => return Ok(()),
                }
            }
        };
        broker
            .health
            .set("broker", HealthState::Up, "connected; relaying the outbox", false);
        tracing::info!("this instance relays the outbox");
        // Two batches at most are out at once: while the broker confirms one (and its
        // progress is recorded), the next is read and sent.
        let mut in_flight: Option<InFlight> = None;
        loop {
            if session_end.is_cancelled() {
                return Ok(());
            }
            if leader.lost.is_cancelled() {
                tracing::warn!("relay lost its database session; taking the lock again");
                continue 'leadership;
            }
            let exclude: Vec<i64> = in_flight
                .as_ref()
                .map(|f| f.batch.iter().map(|r| r.id).collect())
                .unwrap_or_default();
            let next = fetch(&leader.client, broker.config.publish_batch, &exclude);
            let (next, finished) = match in_flight.take() {
                Some(previous) => {
                    let (next, finished) = tokio::join!(next, finish(broker, &leader.client, previous));
                    (next, Some(finished))
                }
                None => (next.await, None),
            };
            if let Some(finished) = finished {
                finished?;
            }
            let batch = match next {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the outbox; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(STANDBY_RETRY) => continue 'leadership,
                        _ = session_end.cancelled() => return Ok(()),
                    }
                }
            };
            if batch.is_empty() {
                // Wait only when no batch was finished in this round: a finished batch's
                // retries, and the rows it held back, are only visible to the next read.
                if exclude.is_empty() {
                    tokio::select! {
                        _ = leader.wake.notified() => {}
                        _ = tokio::time::sleep(IDLE_POLL) => {}
                        _ = session_end.cancelled() => return Ok(()),
                        _ = leader.lost.cancelled() => {}
                    }
                }
                continue;
            }
            let sent = send(broker, channel, batch).await;
            if sent.failure.is_some() {
                // Record what the broker confirmed before the failure; the rest is sent
                // again by the next session. Returns the failure.
                return finish(broker, &leader.client, sent).await;
            }
            in_flight = Some(sent);
        }
    }
}

/// A batch sent to the broker whose confirms are outstanding.
struct InFlight {
    batch: Vec<Pending>,
    /// One per row; None for a row not published (its event is switched off).
    confirms: Vec<Option<lapin::PublisherConfirm>>,
    started: Instant,
    /// A publish that failed part way: the rows from there on have no confirm.
    failure: Option<SessionError>,
}

/// Waits for a batch's confirms and records the outcome. Err on a broker failure (after
/// recording what was confirmed before it).
async fn finish(
    broker: &Broker,
    client: &tokio_postgres::Client,
    mut sent: InFlight,
) -> Result<(), SessionError> {
    let (outcomes, broker_error) = confirm(broker, &mut sent).await;
    if let Err(e) = record(broker, client, &sent.batch, &outcomes).await {
        // The broker has these events; they will be sent again with the same
        // message_id once the database answers.
        tracing::warn!(error = %e, "cannot record relay progress; events will be sent again");
    }
    match broker_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The oldest due rows, in outbox order, leaving out `exclude` (the batch in flight,
/// whose progress is being recorded at the same time).
async fn fetch(
    client: &tokio_postgres::Client,
    limit: usize,
    exclude: &[i64],
) -> Result<Vec<Pending>, tokio_postgres::Error> {
    // A row waiting for its retry holds back the later rows of its aggregate; rows never
    // tried are due at once, so only rows already tried (few) need the check.
    let rows = client
        .query(
            "SELECT o.id, o.message_id, o.aggregate, o.event, o.payload::text, o.attempts
               FROM pulse.outbox o
              WHERE o.delivered_at IS NULL
                AND NOT EXISTS (
                    SELECT 1 FROM pulse.outbox b
                     WHERE b.delivered_at IS NULL AND b.attempts > 0
                       AND b.aggregate = o.aggregate AND b.id <= o.id
                       AND b.next_attempt_at > now())
                AND o.id <> ALL($2)
              ORDER BY o.id
              LIMIT $1",
            &[&(limit as i64), &exclude],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| Pending {
            id: r.get(0),
            message_id: r.get(1),
            aggregate: r.get(2),
            event: r.get(3),
            body: r.get(4),
            attempts: r.get(5),
        })
        .collect())
}

/// The AMQP properties of an event: what Symfony Messenger's AMQP transport with the JSON
/// serializer needs (`type` header, JSON content type) plus persistence and the key.
pub fn event_properties(message_id: &str, class: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("type"),
        AMQPValue::LongString(LongString::from(class)),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_app_id("pulsed".into())
        .with_timestamp(chrono::Utc::now().timestamp() as u64)
        .with_headers(headers)
}

/// Publishes a batch, pipelined, without waiting for the confirms. On a broker failure
/// the rest of the batch is not sent.
async fn send(broker: &Broker, channel: &lapin::Channel, batch: Vec<Pending>) -> InFlight {
    let started = Instant::now();
    let mut confirms = Vec::with_capacity(batch.len());
    let mut failure = None;
    for row in &batch {
        if !broker.catalog.is_enabled(&row.event) {
            confirms.push(None);
            continue;
        }
        let props = event_properties(&row.message_id, &broker.catalog.class_of(&row.event));
        match channel
            .basic_publish(
                broker.config.exchange.as_str().into(),
                row.event.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                row.body.as_bytes(),
                props,
            )
            .await
        {
            Ok(confirm) => confirms.push(Some(confirm)),
            Err(e) => {
                failure = Some(SessionError::Amqp(e));
                break;
            }
        }
    }
    InFlight {
        batch,
        confirms,
        started,
        failure,
    }
}

/// Waits for every confirm of a sent batch. On a broker failure the outcomes stop at the
/// last confirmed event; the rest stay pending.
async fn confirm(broker: &Broker, sent: &mut InFlight) -> (Vec<Outcome>, Option<SessionError>) {
    let mut failure = sent.failure.take();
    let mut outcomes = Vec::with_capacity(sent.confirms.len());
    let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
    for (row, confirm) in sent.batch.iter().zip(sent.confirms.drain(..)) {
        let Some(confirm) = confirm else {
            outcomes.push(Outcome::Skipped);
            continue;
        };
        let Ok(confirm) = tokio::time::timeout_at(deadline, confirm).await else {
            // A broker that neither confirms nor drops the connection (blocked for too
            // long, a half-open link): start a new session; the rest is sent again.
            failure.get_or_insert(SessionError::NoConfirm(CONFIRM_TIMEOUT));
            break;
        };
        match confirm {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => outcomes.push(Outcome::Delivered),
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
                outcomes.push(Outcome::Failed(format!(
                    "returned by the broker ({} {}): no queue is bound to exchange {:?} for routing key {:?}",
                    returned.reply_code, returned.reply_text, broker.config.exchange, row.event
                )))
            }
            Ok(Confirmation::Nack(None)) => outcomes.push(Outcome::Failed(
                "nacked by the broker (it could not store the message)".into(),
            )),
            Err(e) => {
                failure.get_or_insert(SessionError::Amqp(e));
                break;
            }
        }
    }
    let published = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Delivered))
        .count();
    if published > 0 {
        metrics::counter!("pulse_outbox_published_total").increment(published as u64);
        metrics::histogram!("pulse_outbox_confirm_seconds").record(sent.started.elapsed().as_secs_f64());
    }
    (outcomes, failure)
}

/// Marks delivered rows, schedules retries, moves exhausted rows to the dead letters.
async fn record(
    broker: &Broker,
    client: &tokio_postgres::Client,
    batch: &[Pending],
    outcomes: &[Outcome],
) -> Result<(), tokio_postgres::Error> {
    let done: Vec<i64> = batch
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| matches!(o, Outcome::Delivered | Outcome::Skipped))
        .map(|(r, _)| r.id)
        .collect();
    if !done.is_empty() {
        client
            .execute(
                "UPDATE pulse.outbox SET delivered_at = now() WHERE id = ANY($1)",
                &[&done],
            )
            .await?;
    }
    for (row, outcome) in batch.iter().zip(outcomes) {
        let Outcome::Failed(reason) = outcome else {
            continue;
        };
        let attempts = row.attempts + 1;
        metrics::counter!("pulse_outbox_publish_failures_total").increment(1);
        tracing::warn!(message_id = %row.message_id, aggregate = %row.aggregate, event = %row.event, attempts, %reason, "publish failed");
        if attempts as u32 >= broker.config.max_attempts {
            client
                .execute(
                    "WITH moved AS (DELETE FROM pulse.outbox WHERE id = $1 RETURNING *)
                     INSERT INTO pulse.outbox_dead (id, message_id, aggregate, event, payload, created_at, attempts, last_error)
                     SELECT id, message_id, aggregate, event, payload, created_at, $2, $3 FROM moved",
                    &[&row.id, &attempts, reason],
                )
                .await?;
            metrics::counter!("pulse_outbox_dead_letters_total").increment(1);
            tracing::error!(message_id = %row.message_id, event = %row.event, attempts, "event moved to the dead letters");
        } else {
            let delay = retry_delay(&broker.config, attempts as u32);
            client
                .execute(
                    "UPDATE pulse.outbox SET attempts = $2, last_error = $3,
                            next_attempt_at = now() + make_interval(secs => $4)
                      WHERE id = $1",
                    &[&row.id, &attempts, reason, &delay.as_secs_f64()],
                )
                .await?;
        }
    }
    Ok(())
}

/// Delay before the retry after `attempts` failures: doubled each time, capped.
pub fn retry_delay(config: &AmqpConfig, attempts: u32) -> Duration {
    let factor = 1u32.checked_shl(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
    config
        .retry_base
        .checked_mul(factor)
        .unwrap_or(config.retry_max)
        .min(config.retry_max)
}

/// Outbox depth, oldest pending age and dead letters, for `/metrics` and the console.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutboxStats {
    /// Events not yet delivered.
    pub pending: i64,
    /// Age of the oldest of them, in seconds (0 when none).
    pub oldest_pending_secs: f64,
    /// Events in the dead-letter table.
    pub dead: i64,
}

/// Reads the outbox figures.
pub async fn outbox_stats(client: &tokio_postgres::Client) -> Result<OutboxStats, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pulse.outbox WHERE delivered_at IS NULL),
                    (SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
                       FROM pulse.outbox WHERE delivered_at IS NULL),
                    (SELECT count(*) FROM pulse.outbox_dead)",
            &[],
        )
        .await?;
    Ok(OutboxStats {
        pending: row.get(0),
        oldest_pending_secs: row.get(1),
        dead: row.get(2),
    })
}

async fn stats_loop(broker: Arc<Broker>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let Ok(client) = broker.pool.get().await else {
            continue;
        };
        if let Ok(s) = outbox_stats(&client).await {
            metrics::gauge!("pulse_outbox_depth").set(s.pending as f64);
            metrics::gauge!("pulse_outbox_oldest_pending_seconds").set(s.oldest_pending_secs);
            metrics::gauge!("pulse_outbox_dead_letters").set(s.dead as f64);
        }
    }
}

/// One dead-lettered event, for the console.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its original outbox id.
    pub id: i64,
    /// Idempotency key.
    pub message_id: String,
    /// Aggregate.
    pub aggregate: String,
    /// Event name.
    pub event: String,
    /// Failed attempts.
    pub attempts: i32,
    /// The last failure.
    pub last_error: String,
    /// When it gave up, RFC 3339.
    pub dead_at: String,
}

/// The newest dead letters, up to `limit`.
pub async fn dead_letters(
    client: &tokio_postgres::Client,
    limit: i64,
) -> Result<Vec<DeadLetter>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, message_id, aggregate, event, attempts, last_error,
                    to_char(dead_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
               FROM pulse.outbox_dead ORDER BY dead_at DESC, id DESC LIMIT $1",
            &[&limit],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| DeadLetter {
            id: r.get(0),
            message_id: r.get(1),
            aggregate: r.get(2),
            event: r.get(3),
            attempts: r.get(4),
            last_error: r.get(5),
            dead_at: r.get(6),
        })
        .collect())
}

/// Puts a dead letter back into the outbox (same message_id, attempts reset), audited.
/// Returns false when no dead letter has that id.
pub async fn requeue_dead_letter(
    client: &mut tokio_postgres::Client,
    id: i64,
    actor: &str,
) -> Result<bool, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let moved = tx
        .execute(
            "WITH dead AS (DELETE FROM pulse.outbox_dead WHERE id = $1 RETURNING *)
             INSERT INTO pulse.outbox (message_id, aggregate, event, payload, created_at)
             SELECT message_id, aggregate, event, payload, created_at FROM dead",
            &[&id],
        )
        .await?;
    if moved == 1 {
        tx.execute(
            "INSERT INTO pulse.audit_log (actor, action, target) VALUES ($1, 'outbox.requeue', $2)",
            &[&actor, &id.to_string()],
        )
        .await?;
        tx.execute(crate::outbox::ANNOUNCE, &[&NOTIFY_CHANNEL]).await?;
    }
    tx.commit().await?;
    Ok(moved == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AmqpConfig {
        AmqpConfig {
            url: crate::config::Secret::new("amqp://x"),
            exchange: "e".into(),
            declare_topology: true,
            commands_queue: None,
            commands_dead_letter_queue: "d".into(),
            commands_prefetch: 1,
            publish_batch: 10,
            max_attempts: 5,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            presence_debounce: Duration::ZERO,
        }
    }

    #[test]
    fn retry_delays_double_and_are_capped() {
        let c = config();
        assert_eq!(retry_delay(&c, 1), Duration::from_millis(500));
        assert_eq!(retry_delay(&c, 2), Duration::from_secs(1));
        assert_eq!(retry_delay(&c, 4), Duration::from_secs(4));
        assert_eq!(retry_delay(&c, 20), Duration::from_secs(60));
        assert_eq!(retry_delay(&c, 200), Duration::from_secs(60));
    }

    #[test]
    fn events_carry_what_symfony_needs() {
        let p = event_properties("lsn:0/1:0", "App\\Message\\Pulse\\PresenceJoined");
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("lsn:0/1:0"));
        let headers = p.headers().as_ref().unwrap();
        assert_eq!(
            headers.inner().get("type"),
            Some(&AMQPValue::LongString(
                "App\\Message\\Pulse\\PresenceJoined".into()
            ))
        );
    }
}
