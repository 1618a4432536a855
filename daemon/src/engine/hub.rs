//! The hub: every live session, every subscription, the bounded update history and
//! presence, behind one std mutex that is never held across an await.
//!
//! Delivery is `try_send` into each session's bounded writer queue: a full queue means the
//! client stopped reading, so its session is cancelled (cut loose) and nobody else waits.
//! Which subscribers a change reaches is worked out once per change: subscriptions with
//! the same tenant, owner and filters share a group, so each group's filter is evaluated
//! once and the same update goes to all its members.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use pulse_cdc::Value;
use pulse_shared::protocol::{PresenceEvent, ServerFrame, UpdateOp};
use serde_json::Value as Json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::value;

/// The built-in metric of users online in a tenant (`metric:online`), fed by presence.
pub const ONLINE_METRIC: &str = "online";

/// A session's id, unique within the process.
pub type SessionId = u64;

/// Hashes session ids (small sequential integers) with one multiply. The fan-out looks
/// sessions up once per subscriber per change, and SipHash, the default, was a visible
/// share of its time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionHasher(u64);

impl std::hash::Hasher for SessionHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by session id.
type BySession<V> = HashMap<SessionId, V, std::hash::BuildHasherDefault<SessionHasher>>;

/// One live-table update ready for the wire. It is serialized once per group: `tail`
/// (everything after the subscription id) is shared by every member of the group, and
/// `id` (the member's subscription id, already JSON-quoted) is shared by every update of
/// that subscription, so queueing it for a client copies two pointers.
#[derive(Debug, Clone)]
pub struct UpdatePiece {
    /// The subscription id as a JSON string (quotes included).
    pub id: Arc<str>,
    /// The rest of the `update` frame, from the `,"cursor":` after the id to the end.
    pub tail: Arc<str>,
}

const UPDATE_HEAD: &str = r#"{"type":"update","id":"#;
const UPDATES_HEAD: &str = r#"{"type":"updates","updates":["#;

impl UpdatePiece {
    /// Bytes of its `update` frame.
    pub fn len(&self) -> usize {
        UPDATE_HEAD.len() + self.id.len() + self.tail.len()
    }

    /// Whether it is empty (never: an update frame has a head).
    pub fn is_empty(&self) -> bool {
        false
    }

    fn write(&self, out: &mut String) {
        out.push_str(UPDATE_HEAD);
        out.push_str(&self.id);
        out.push_str(&self.tail);
    }
}

/// The wire text of live updates: one `update` frame, or an `updates` frame holding
/// them all in order. Its capacity is exactly its length, so the writer's conversion to
/// `Bytes` takes the buffer as it is (with room to spare it would allocate a shared
/// header, freed again once the frame is sent: one more allocation per frame).
pub fn encode_updates<P: std::borrow::Borrow<UpdatePiece>>(
    pieces: impl IntoIterator<Item = P> + Clone,
) -> String {
    let (count, bytes) = pieces
        .clone()
        .into_iter()
        .fold((0usize, 0usize), |(n, b), p| (n + 1, b + p.borrow().len()));
    if count == 1 {
        let mut out = String::with_capacity(bytes);
        pieces.into_iter().for_each(|p| p.borrow().write(&mut out));
        return out;
    }
    updates_frame(bytes + count.saturating_sub(1), |out| write_pieces(pieces, out))
}

/// An `updates` frame around `items` (comma-separated update frames of `bytes` bytes
/// in all), its capacity exactly its length.
fn updates_frame(bytes: usize, items: impl FnOnce(&mut String)) -> String {
    let exact = UPDATES_HEAD.len() + bytes + 2;
    let mut out = String::with_capacity(exact);
    out.push_str(UPDATES_HEAD);
    items(&mut out);
    out.push_str("]}");
    debug_assert_eq!(out.len(), exact, "sized exactly");
    out
}

/// The pieces' update frames, comma-separated.
fn write_pieces<P: std::borrow::Borrow<UpdatePiece>>(pieces: impl IntoIterator<Item = P>, out: &mut String) {
    for (i, p) in pieces.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        p.borrow().write(out);
    }
}

/// The items of an encoded `update` or `updates` frame: the frame itself, or what its
/// brackets hold.
fn items_of(text: &str) -> &str {
    text.strip_prefix(UPDATES_HEAD)
        .and_then(|t| t.strip_suffix("]}"))
        .unwrap_or(text)
}

/// The wire text of live entries ([`Outgoing::Updates`] and [`Outgoing::Live`]) queued
/// side by side: a lone encoded entry as it is (no copy), otherwise one `updates` frame
/// holding all their updates in order.
pub fn merge_live(run: Vec<Outgoing>) -> Utf8Bytes {
    let mut run: Vec<Outgoing> = run.into_iter().filter(|o| o.live_len() > 0).collect();
    if run.len() == 1 {
        return run.pop().expect("one entry").into_wire();
    }
    let items = |o: &Outgoing| match o {
        Outgoing::Live(text) => items_of(text).len(),
        Outgoing::Updates(pieces) => pieces.iter().map(UpdatePiece::len).sum::<usize>() + pieces.len() - 1,
        Outgoing::Frame(_) => 0,
    };
    let bytes = run.iter().map(items).sum::<usize>() + run.len().saturating_sub(1);
    updates_frame(bytes, |out| {
        for (i, o) in run.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            match o {
                Outgoing::Live(text) => out.push_str(items_of(text)),
                Outgoing::Updates(pieces) => write_pieces(pieces, out),
                Outgoing::Frame(_) => {}
            }
        }
    })
    .into()
}

/// What goes into a session's writer queue: a frame, live updates already serialized
/// (see [`UpdatePiece`]), or live updates encoded once for every session they go to.
/// The writer sends live entries queued side by side as one `updates` frame (see
/// [`merge_live`]).
#[derive(Debug)]
pub enum Outgoing {
    /// A frame, serialized by the writer.
    Frame(ServerFrame),
    /// Live-table updates for this session, in order (one engine batch).
    Updates(Vec<UpdatePiece>),
    /// Live-table updates as the text of an `update` or `updates` frame, encoded once
    /// for all the members of a group with the same subscription id (see
    /// [`Hub::flush_live`]): queueing it for a session copies a pointer.
    Live(Utf8Bytes),
}

impl Outgoing {
    /// The JSON text on the wire.
    pub fn into_text(self) -> String {
        match self {
            Outgoing::Frame(f) => serde_json::to_string(&f).expect("server frames serialize"),
            Outgoing::Updates(u) => encode_updates(&u),
            Outgoing::Live(t) => t.as_str().to_string(),
        }
    }

    /// The text on the wire, as the writer sends it: shared text as it is (no copy).
    pub fn into_wire(self) -> Utf8Bytes {
        match self {
            Outgoing::Live(text) => text,
            other => other.into_text().into(),
        }
    }

    /// Bytes of live updates it holds (none for a frame).
    pub fn live_len(&self) -> usize {
        match self {
            Outgoing::Frame(_) => 0,
            Outgoing::Updates(pieces) => pieces.iter().map(UpdatePiece::len).sum(),
            Outgoing::Live(text) => text.len(),
        }
    }

    /// The frame (parsed back when pre-serialized), for tests and diagnostics.
    pub fn into_frame(self) -> ServerFrame {
        match self {
            Outgoing::Frame(f) => f,
            other => serde_json::from_str(&other.into_text()).expect("pre-serialized frames parse"),
        }
    }
}

/// What the hub keeps of a session: where its frames go and how to cut it loose.
pub struct SessionHandle {
    /// The session's bounded writer queue.
    pub tx: mpsc::Sender<Outgoing>,
    /// Cancelled when the session must end (slow client).
    pub kill: CancellationToken,
}

/// A row of a live table as the engine holds it between the stream and the wire.
#[derive(Debug, Clone)]
pub struct LiveRow {
    /// Typed values of the columns the engine filters on (tenant, owner, filters).
    pub vals: HashMap<String, Value>,
    /// The primary key, as a JSON object.
    pub key: Json,
    /// The visible columns, as a JSON object.
    pub row: Json,
}

/// One change to a live table, kept in the history for resume.
#[derive(Debug)]
pub struct LiveChange {
    /// Its position.
    pub seq: u64,
    /// The live table's schema name.
    pub table: String,
    /// The row before (updates, deletes).
    pub old: Option<LiveRow>,
    /// The row after (inserts, updates).
    pub new: Option<LiveRow>,
}

/// The rows a live subscription sees: its tenant (None: every tenant), its owner (members
/// on tables with an owner column) and equality filters.
#[derive(Debug, Clone, PartialEq)]
pub struct RowFilter {
    /// Tenant column and value.
    pub tenant: Option<(String, String)>,
    /// Owner column and value.
    pub owner: Option<(String, String)>,
    /// Equality filters, sorted by column.
    pub eq: Vec<(String, Value)>,
}

impl RowFilter {
    /// Whether a row passes.
    pub fn matches(&self, row: &LiveRow) -> bool {
        let text_eq = |col: &str, want: &str| {
            row.vals
                .get(col)
                .is_some_and(|v| value::key_text(v) == want && !matches!(v, Value::Null))
        };
        if let Some((c, t)) = &self.tenant
            && !text_eq(c, t)
        {
            return false;
        }
        if let Some((c, o)) = &self.owner
            && !text_eq(c, o)
        {
            return false;
        }
        self.eq.iter().all(|(c, want)| {
            row.vals
                .get(c)
                .is_some_and(|v| value::compare(v, want) == Some(std::cmp::Ordering::Equal))
        })
    }
}

fn op_for(filter: &RowFilter, change: &LiveChange) -> Option<UpdateOp> {
    let was = change.old.as_ref().is_some_and(|r| filter.matches(r));
    let is = change.new.as_ref().is_some_and(|r| filter.matches(r));
    match (was, is) {
        (true, true) => Some(UpdateOp::Update),
        (false, true) => Some(UpdateOp::Insert),
        (true, false) => Some(UpdateOp::Delete),
        (false, false) => None,
    }
}

fn update_frame(id: &str, cursor: String, op: UpdateOp, change: &LiveChange) -> ServerFrame {
    let (key, row) = match op {
        UpdateOp::Delete => (
            change.old.as_ref().map(|r| r.key.clone()).unwrap_or_default(),
            None,
        ),
        _ => {
            let n = change.new.as_ref().expect("insert and update have a new row");
            (n.key.clone(), Some(n.row.clone()))
        }
    };
    ServerFrame::Update {
        id: id.to_string(),
        cursor: Some(cursor),
        op,
        key,
        row,
    }
}

struct Group {
    filter: RowFilter,
    members: Vec<Member>,
    /// The updates staged for the whole group since the last flush, in order: each
    /// position with the serialized rest of its frame after the subscription id (see
    /// [`UpdatePiece::tail`]). Staging a change costs the same for one member or ten
    /// thousand; the members are visited once per flush.
    staged: Vec<(u64, Arc<str>)>,
}

impl Group {
    fn new(filter: RowFilter) -> Group {
        Group {
            filter,
            members: Vec::new(),
            staged: Vec::new(),
        }
    }
}

/// A live subscription inside its group.
struct Member {
    session: SessionId,
    id: String,
    /// `id` as a JSON string, shared by all its updates.
    quoted: Arc<str>,
    /// The position it joined at: of the group's staged updates it takes those after it
    /// (its initial result or a resume's replay covers the rest).
    after: u64,
}

impl Member {
    fn new(session: SessionId, id: &str, after: u64) -> Member {
        Member {
            session,
            id: id.to_string(),
            quoted: serde_json::to_string(id).expect("strings serialize").into(),
            after,
        }
    }
}

/// Distinct subscription ids a group's flush encodes a shared frame for; members with
/// further ids get their updates as pieces, encoded by their own writer.
const SHARED_IDS: usize = 4;

/// What a subscription is, so it can be removed.
#[derive(Debug, Clone)]
enum SubKind {
    Live { table: String, filter: RowFilter },
    Metric { metric: String, tenant: String },
    Inbox { tenant: String, user: String },
    Presence { tenant: Option<String> },
}

/// One presence subscription.
struct PresenceSub {
    session: SessionId,
    id: String,
    resource: Option<String>,
}

/// One open tab of a user.
struct Tab {
    resource: String,
    state: Json,
    seen: Instant,
    at: u64,
}

/// A user's presence within a tenant: one entry per session (tab); the latest heartbeat
/// decides what the others see, and the user is online while any tab is.
#[derive(Default)]
struct UserPresence {
    tabs: HashMap<SessionId, Tab>,
}

impl UserPresence {
    fn effective(&self) -> Option<(&str, &Json)> {
        self.tabs
            .values()
            .max_by_key(|t| t.at)
            .map(|t| (t.resource.as_str(), &t.state))
    }
}

/// Where a presence change came from and where it went.
type Effective = Option<(String, Json)>;

/// The hub's state.
#[derive(Default)]
pub struct Hub {
    sessions: BySession<SessionHandle>,
    subs: BySession<HashMap<String, SubKind>>,
    /// Whose each session is (user id, or the session itself for services), so the
    /// subscription limit holds per user across their sessions.
    user_of: BySession<String>,
    /// Subscriptions per user.
    per_user: HashMap<String, usize>,
    /// Next update position.
    seq: u64,
    history: VecDeque<Arc<LiveChange>>,
    history_cap: usize,
    /// Live subscriptions: table -> tenant (None = all) -> groups.
    live: HashMap<String, HashMap<Option<String>, Vec<Group>>>,
    metric_subs: HashMap<(String, String), Vec<(SessionId, String)>>,
    inbox_subs: HashMap<(String, String), Vec<(SessionId, String)>>,
    presence_subs: HashMap<Option<String>, Vec<PresenceSub>>,
    /// Subscriptions whose initial result is still being read (session -> subscription
    /// id): their updates wait here.
    pending: BySession<HashMap<String, Vec<Outgoing>>>,
    /// The (table, tenant) buckets holding groups with staged updates (see
    /// [`Group::staged`]), sent by [`Hub::flush_live`]; a bucket may be listed twice.
    dirty: Vec<(String, Option<String>)>,
    /// Scratch set of [`Hub::flush_live`], kept for its room.
    flush_seen: BySession<()>,
    /// When staged updates last went out, and to how many sessions (see
    /// [`Hub::flush_live_within`]).
    last_flush: Option<(Instant, usize)>,
    /// Commit times of the transactions whose updates are staged (see
    /// [`Hub::staged_commit`]), for the delivery latency recorded when a flush empties
    /// `dirty`: never left non-empty while `dirty` is empty.
    staged_commits: Vec<std::time::SystemTime>,
    /// Whether [`Hub::stage_live`] staged anything since the last [`Hub::staged_commit`].
    staged_since_commit: bool,
    /// `pulse_live_delivery_latency_seconds`, registered at its first use (after the
    /// recorder is installed) rather than looked up for every sample.
    delivery_latency: Option<metrics::Histogram>,
    /// tenant -> user -> tabs.
    presence: HashMap<String, HashMap<String, UserPresence>>,
    clock: u64,
    epoch: u64,
    /// Users who came online (true) or went offline (false) in a tenant, kept for the
    /// outbox's presence events once [`Hub::record_presence`] turned it on.
    transitions: Option<Vec<(String, String, bool)>>,
}

/// Why a subscription could not be added.
#[derive(Debug, PartialEq, Eq)]
pub enum SubError {
    /// The id is in use in this session.
    Duplicate,
    /// The session has too many.
    TooMany(usize),
}

/// From how many sessions a flush of live updates is followed by the whole window.
pub const FULL_WINDOW_REACH: usize = 256;

/// How long live updates wait after a flush that reached `reach` sessions: the whole
/// `window` from [`FULL_WINDOW_REACH`] sessions on, proportionally less below. The pause
/// exists to bound frames per second under load, and a flush costs in proportion to the
/// sessions it reaches: a flush to a handful of clients is cheap, and making them wait a
/// whole window would only add latency.
pub fn live_pause(window: Duration, reach: usize) -> Duration {
    window.mul_f64((reach as f64 / FULL_WINDOW_REACH as f64).min(1.0))
}

impl Hub {
    /// A hub keeping `history_cap` updates for resume; `epoch` makes cursors of an earlier
    /// process recognisably stale.
    pub fn new(history_cap: usize, epoch: u64) -> Hub {
        Hub {
            history_cap,
            epoch,
            ..Hub::default()
        }
    }

    /// The cursor of position `seq`.
    pub fn cursor(&self, seq: u64) -> String {
        format!("{:x}-{seq}", self.epoch)
    }

    /// The current cursor.
    pub fn current_cursor(&self) -> String {
        self.cursor(self.seq)
    }

    fn parse_cursor(&self, c: &str) -> Option<u64> {
        let (epoch, seq) = c.split_once('-')?;
        (u64::from_str_radix(epoch, 16).ok()? == self.epoch).then_some(())?;
        let seq: u64 = seq.parse().ok()?;
        (seq <= self.seq).then_some(seq)
    }

    /// Number of sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Registers a session.
    pub fn add_session(&mut self, id: SessionId, handle: SessionHandle) {
        self.sessions.insert(id, handle);
    }

    /// Queues a frame for one session; a full queue cuts the session loose. Live updates
    /// staged for the session go first, they are older: then every session's staged
    /// updates go out now, ahead of their window (the flush is per group, not per
    /// session).
    pub fn deliver(&mut self, session: SessionId, frame: ServerFrame) {
        if self.has_staged(session) {
            self.flush_live();
        }
        self.deliver_out(session, Outgoing::Frame(frame));
    }

    /// Whether a group the session subscribes to has staged updates.
    fn has_staged(&self, session: SessionId) -> bool {
        if self.dirty.is_empty() {
            return false;
        }
        let Some(subs) = self.subs.get(&session) else {
            return false;
        };
        subs.values().any(|kind| match kind {
            SubKind::Live { table, filter } => {
                let tenant = filter.tenant.as_ref().map(|(_, t)| t.as_str());
                self.dirty
                    .iter()
                    .filter(|(t, n)| t == table && n.as_deref() == tenant)
                    .filter_map(|(t, n)| self.live.get(t)?.get(n))
                    .flatten()
                    .any(|g| !g.staged.is_empty() && g.filter == *filter)
            }
            _ => false,
        })
    }

    fn deliver_out(&mut self, session: SessionId, out: Outgoing) {
        let cut = match self.sessions.get(&session) {
            None => false,
            Some(h) => match h.tx.try_send(out) {
                Ok(()) => false,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(session, "client stopped reading; cutting it loose");
                    metrics::counter!("pulse_slow_clients_cut_total").increment(1);
                    h.kill.cancel();
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => true,
            },
        };
        if cut {
            // Its subscriptions stop here; presence leaves when the session task ends.
            self.drop_subscriptions(session);
            self.sessions.remove(&session);
        }
    }

    /// Records whose session this is (for the per-user subscription limit).
    pub fn bind_user(&mut self, session: SessionId, user: &str) {
        self.user_of.entry(session).or_insert_with(|| user.to_string());
    }

    fn user_key(&self, session: SessionId) -> String {
        self.user_of
            .get(&session)
            .cloned()
            .unwrap_or_else(|| format!("session:{session}"))
    }

    fn add_sub(&mut self, session: SessionId, id: &str, kind: SubKind, max: usize) -> Result<(), SubError> {
        let user = self.user_key(session);
        let held = self.per_user.get(&user).copied().unwrap_or(0);
        let subs = self.subs.entry(session).or_default();
        if subs.contains_key(id) {
            return Err(SubError::Duplicate);
        }
        if held >= max {
            return Err(SubError::TooMany(max));
        }
        subs.insert(id.to_string(), kind);
        *self.per_user.entry(user).or_default() += 1;
        metrics::gauge!("pulse_subscriptions").increment(1.0);
        Ok(())
    }

    /// Opens a live-table subscription in the pending state; returns the cursor its
    /// initial result is valid at. Updates wait until [`Hub::complete`].
    pub fn subscribe_live(
        &mut self,
        session: SessionId,
        id: &str,
        table: &str,
        filter: RowFilter,
        max: usize,
    ) -> Result<String, SubError> {
        self.add_sub(
            session,
            id,
            SubKind::Live {
                table: table.to_string(),
                filter: filter.clone(),
            },
            max,
        )?;
        self.pending
            .entry(session)
            .or_default()
            .insert(id.to_string(), Vec::new());
        self.join_group(session, id, table, filter);
        Ok(self.current_cursor())
    }

    /// Adds a member to its group; it takes the updates after the current position.
    fn join_group(&mut self, session: SessionId, id: &str, table: &str, filter: RowFilter) {
        let tenant = filter.tenant.as_ref().map(|(_, t)| t.clone());
        let member = Member::new(session, id, self.seq);
        let groups = self
            .live
            .entry(table.to_string())
            .or_default()
            .entry(tenant)
            .or_default();
        match groups.iter_mut().find(|g| g.filter == filter) {
            Some(g) => g.members.push(member),
            None => {
                let mut g = Group::new(filter);
                g.members.push(member);
                groups.push(g);
            }
        }
    }

    /// Sends a pending subscription's initial result, then what arrived meanwhile.
    pub fn complete(&mut self, session: SessionId, id: &str, result: ServerFrame) {
        // Staged updates are older than the result's cursor only if already flushed.
        self.flush_live();
        let waiting = self.take_pending(session, id).unwrap_or_default();
        self.deliver(session, result);
        for f in waiting {
            self.deliver_out(session, f);
        }
    }

    /// Re-opens a live subscription after a reconnect. When the history reaches back to
    /// `cursor`, the missed updates are sent and `true` is returned; otherwise the
    /// subscription is left pending (a fresh result must follow) and `false` is returned.
    pub fn resume_live(
        &mut self,
        session: SessionId,
        id: &str,
        table: &str,
        filter: RowFilter,
        cursor: &str,
        max: usize,
    ) -> Result<bool, SubError> {
        let from = self.parse_cursor(cursor);
        let oldest = self.history.front().map_or(self.seq + 1, |c| c.seq);
        // Every position after `from` must still be in the history.
        let covered = from.is_some_and(|f| f + 1 >= oldest);
        if !covered {
            self.subscribe_live(session, id, table, filter, max)?;
            return Ok(false);
        }
        let from = from.unwrap_or(0);
        self.add_sub(
            session,
            id,
            SubKind::Live {
                table: table.to_string(),
                filter: filter.clone(),
            },
            max,
        )?;
        let missed: Vec<ServerFrame> = self
            .history
            .iter()
            .filter(|c| c.seq > from && c.table == table)
            .filter_map(|c| op_for(&filter, c).map(|op| update_frame(id, self.cursor(c.seq), op, c)))
            .collect();
        // Joined before the replay (taking only what comes after it), so that a replay
        // that fills the client's queue and cuts it removes the membership with the rest.
        self.join_group(session, id, table, filter);
        for f in missed {
            self.deliver(session, f);
        }
        Ok(true)
    }

    /// For polling: the updates of `table` after `cursor` that `filter` sees, and the
    /// cursor to poll from next; `None` when the history no longer reaches back.
    pub fn since(&self, table: &str, filter: &RowFilter, cursor: &str) -> Option<(Vec<ServerFrame>, String)> {
        let from = self.parse_cursor(cursor)?;
        let oldest = self.history.front().map_or(self.seq + 1, |c| c.seq);
        if from + 1 < oldest {
            return None;
        }
        let updates = self
            .history
            .iter()
            .filter(|c| c.seq > from && c.table == table)
            .filter_map(|c| op_for(filter, c).map(|op| update_frame("poll", self.cursor(c.seq), op, c)))
            .collect();
        Some((updates, self.current_cursor()))
    }

    /// Publishes one live-table change now: [`Hub::stage_live`] then [`Hub::flush_live`].
    pub fn publish_live(
        &mut self,
        table: &str,
        tenant_col: &str,
        old: Option<LiveRow>,
        new: Option<LiveRow>,
    ) {
        self.stage_live(table, tenant_col, old, new);
        self.flush_live();
    }

    /// Takes one live-table change into the history and stages its update in every
    /// group it reaches (serialized once per group, whatever its number of members).
    /// Staged updates go out at the next [`Hub::flush_live`]; call it before letting go
    /// of the hub.
    pub fn stage_live(&mut self, table: &str, tenant_col: &str, old: Option<LiveRow>, new: Option<LiveRow>) {
        self.seq += 1;
        let change = Arc::new(LiveChange {
            seq: self.seq,
            table: table.to_string(),
            old,
            new,
        });
        if self.history_cap > 0 {
            self.history.push_back(change.clone());
            while self.history.len() > self.history_cap {
                self.history.pop_front();
            }
        }
        let cursor = self.cursor(self.seq);
        let Some(by_tenant) = self.live.get_mut(table) else {
            return;
        };
        let tenant_of = |r: &Option<LiveRow>| {
            r.as_ref()
                .and_then(|r| r.vals.get(tenant_col))
                .map(value::key_text)
        };
        let mut tenant_keys: Vec<Option<String>> = vec![None];
        for t in [tenant_of(&change.old), tenant_of(&change.new)]
            .into_iter()
            .flatten()
        {
            if !tenant_keys.iter().any(|k| k.as_deref() == Some(t.as_str())) {
                tenant_keys.push(Some(t));
            }
        }
        let mut staged_any = false;
        for key in tenant_keys {
            let Some(groups) = by_tenant.get_mut(&key) else {
                continue;
            };
            let mut bucket_dirty = false;
            for g in groups.iter_mut() {
                let Some(op) = op_for(&g.filter, &change) else {
                    continue;
                };
                // Serialized once for the group: everything after the id is the same.
                let whole = serde_json::to_string(&update_frame("", cursor.clone(), op, &change))
                    .expect("server frames serialize");
                let tail: Arc<str> = whole
                    .strip_prefix(UPDATE_HEAD)
                    .and_then(|t| t.strip_prefix(r#""""#))
                    .expect("update frames start with their type and id")
                    .into();
                bucket_dirty |= g.staged.is_empty();
                g.staged.push((change.seq, tail));
                staged_any = true;
            }
            if bucket_dirty {
                self.dirty.push((table.to_string(), key));
            }
        }
        self.staged_since_commit |= staged_any;
    }

    /// Sends the staged live updates unless the last send was less than its pause ago
    /// (see [`live_pause`]); then they stay staged and the instant they are due is
    /// returned (a later [`Hub::flush_live`] sends them).
    pub fn flush_live_within(&mut self, now: Instant, window: Duration) -> Option<Instant> {
        if self.dirty.is_empty() {
            return None;
        }
        if let Some(due) = self.pause_end(window)
            && now < due
        {
            return Some(due);
        }
        self.flush_live();
        None
    }

    /// When the pause after the last flush ends; `None` before the first flush.
    fn pause_end(&self, window: Duration) -> Option<Instant> {
        self.last_flush.map(|(t, reach)| t + live_pause(window, reach))
    }

    /// When staged live updates may go out (the last send plus its pause); `None` when
    /// nothing is staged.
    pub fn live_due(&self, window: Duration) -> Option<Instant> {
        if self.dirty.is_empty() {
            return None;
        }
        Some(self.pause_end(window).unwrap_or_else(Instant::now))
    }

    /// Notes the commit time of a transaction whose updates were just staged: when they go
    /// out, `pulse_live_delivery_latency_seconds` records the time from the commit to the
    /// flush that queued them for their sessions (clamped at zero should the database's
    /// clock be ahead of ours).
    pub fn staged_commit(&mut self, committed: std::time::SystemTime) {
        if std::mem::take(&mut self.staged_since_commit) {
            self.staged_commits.push(committed);
            if self.dirty.is_empty() {
                // Already out (a truncate in the same transaction flushed it).
                self.record_delivery();
            }
        }
    }

    /// Records the delivery latency of the transactions noted by [`Hub::staged_commit`];
    /// called by every flush (they all send everything staged).
    fn record_delivery(&mut self) {
        if self.staged_commits.is_empty() {
            return;
        }
        let now = std::time::SystemTime::now();
        let histogram = self
            .delivery_latency
            .get_or_insert_with(|| metrics::histogram!("pulse_live_delivery_latency_seconds"));
        for committed in self.staged_commits.drain(..) {
            histogram.record(now.duration_since(committed).unwrap_or_default().as_secs_f64());
        }
    }

    /// Sends the staged live updates. Per dirty group, a frame is encoded once for each
    /// subscription id its members use (up to [`SHARED_IDS`]) and queued for every member
    /// with that id; a session with staged updates in several groups gets them as one
    /// entry in position order, and a subscription still reading its initial result
    /// keeps them until [`Hub::complete`].
    pub fn flush_live(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        // Sessions with more than one subscription among the dirty groups, with their
        // updates: they get them all as one entry, in position order (a client resumes
        // from the last cursor it saw, whichever subscription it came with).
        // Counted are the memberships that take something now: not those that joined
        // after all of it, nor those whose initial result is still being read.
        let mut merged: BySession<Vec<(u64, UpdatePiece)>> = BySession::default();
        let mut seen = std::mem::take(&mut self.flush_seen);
        for g in self.live_groups(&dirty) {
            let Some(&(last, _)) = g.staged.last() else {
                continue;
            };
            for m in g.members.iter().filter(|m| m.after < last && !self.is_pending(m)) {
                if seen.insert(m.session, ()).is_some() {
                    merged.entry(m.session).or_default();
                }
            }
        }
        seen.clear();
        self.flush_seen = seen;
        let mut out: Vec<(SessionId, Outgoing)> = Vec::new();
        for (table, tenant) in &dirty {
            let Some(groups) = self.live.get_mut(table).and_then(|t| t.get_mut(tenant)) else {
                continue;
            };
            for g in groups.iter_mut().filter(|g| !g.staged.is_empty()) {
                let mut staged = std::mem::take(&mut g.staged);
                let mut shared: Vec<(Arc<str>, Utf8Bytes)> = Vec::new();
                for m in &g.members {
                    let from = staged.partition_point(|(seq, _)| *seq <= m.after);
                    if from == staged.len() {
                        continue;
                    }
                    let quoted = &m.quoted;
                    let pieces = || {
                        staged[from..].iter().map(move |(_, tail)| UpdatePiece {
                            id: quoted.clone(),
                            tail: tail.clone(),
                        })
                    };
                    if let Some(buf) = self
                        .pending
                        .get_mut(&m.session)
                        .and_then(|p| p.get_mut(m.id.as_str()))
                    {
                        let new = pieces();
                        match buf.last_mut() {
                            Some(Outgoing::Updates(u)) => u.extend(new),
                            _ => buf.push(Outgoing::Updates(new.collect())),
                        }
                        continue;
                    }
                    if let Some(all) = merged.get_mut(&m.session) {
                        all.extend(staged[from..].iter().map(|(seq, _)| *seq).zip(pieces()));
                        continue;
                    }
                    let text = match shared.iter().find(|(id, _)| *id == m.quoted) {
                        Some((_, text)) if from == 0 => Some(text.clone()),
                        None if from == 0 && shared.len() < SHARED_IDS => {
                            let text = Utf8Bytes::from(encode_updates(pieces()));
                            shared.push((m.quoted.clone(), text.clone()));
                            Some(text)
                        }
                        _ => None,
                    };
                    let entry = match text {
                        Some(t) => Outgoing::Live(t),
                        None => Outgoing::Updates(pieces().collect()),
                    };
                    out.push((m.session, entry));
                }
                // Emptied, not dropped: the group keeps its room for the next batch.
                staged.clear();
                g.staged = staged;
            }
        }
        for (session, mut all) in merged {
            if all.is_empty() {
                continue;
            }
            // Stable: the updates of one position stay in their group order.
            all.sort_by_key(|(seq, _)| *seq);
            out.push((
                session,
                Outgoing::Updates(all.into_iter().map(|(_, p)| p).collect()),
            ));
        }
        self.last_flush = Some((Instant::now(), out.len()));
        for (session, entry) in out {
            self.deliver_out(session, entry);
        }
        self.record_delivery();
    }

    /// Whether the membership's initial result is still being read.
    fn is_pending(&self, m: &Member) -> bool {
        !self.pending.is_empty()
            && self
                .pending
                .get(&m.session)
                .is_some_and(|p| p.contains_key(m.id.as_str()))
    }

    /// The groups of the listed (table, tenant) buckets.
    fn live_groups<'a>(
        &'a self,
        buckets: &'a [(String, Option<String>)],
    ) -> impl Iterator<Item = &'a Group> + 'a {
        buckets
            .iter()
            .filter_map(|(table, tenant)| self.live.get(table)?.get(tenant))
            .flatten()
    }

    /// Removes a subscription's pending buffer, if it is pending.
    fn take_pending(&mut self, session: SessionId, id: &str) -> Option<Vec<Outgoing>> {
        let mine = self.pending.get_mut(&session)?;
        let buf = mine.remove(id);
        if mine.is_empty() {
            self.pending.remove(&session);
        }
        buf
    }

    /// The table was truncated: every subscriber starts again from an empty result.
    pub fn resnapshot_table(&mut self, table: &str) {
        self.flush_live();
        self.seq += 1;
        // Resuming across a truncate would replay rows that are gone.
        self.history.clear();
        let cursor = self.current_cursor();
        let members: Vec<(SessionId, String)> = self
            .live
            .get(table)
            .map(|t| {
                t.values()
                    .flatten()
                    .flat_map(|g| g.members.iter().map(|m| (m.session, m.id.clone())))
                    .collect()
            })
            .unwrap_or_default();
        for (s, id) in members {
            self.deliver(s, ServerFrame::Resnapshot { id: id.clone() });
            self.deliver(
                s,
                ServerFrame::Result {
                    id,
                    cursor: Some(cursor.clone()),
                    data: Json::Array(Vec::new()),
                },
            );
        }
    }

    /// Subscribes to a metric of a tenant.
    pub fn subscribe_metric(
        &mut self,
        session: SessionId,
        id: &str,
        metric: &str,
        tenant: &str,
        max: usize,
    ) -> Result<(), SubError> {
        self.add_sub(
            session,
            id,
            SubKind::Metric {
                metric: metric.to_string(),
                tenant: tenant.to_string(),
            },
            max,
        )?;
        self.metric_subs
            .entry((metric.to_string(), tenant.to_string()))
            .or_default()
            .push((session, id.to_string()));
        Ok(())
    }

    /// The (metric, tenant) pairs someone watches.
    pub fn watched_metrics(&self) -> Vec<(String, String)> {
        self.metric_subs.keys().cloned().collect()
    }

    /// Sends a metric's new value to its watchers.
    pub fn publish_metric(&mut self, metric: &str, tenant: &str, value: &Json) {
        let Some(subs) = self.metric_subs.get(&(metric.to_string(), tenant.to_string())) else {
            return;
        };
        let out: Vec<_> = subs
            .iter()
            .map(|(s, id)| {
                (
                    *s,
                    ServerFrame::Value {
                        id: id.clone(),
                        name: "value".into(),
                        value: value.clone(),
                    },
                )
            })
            .collect();
        for (s, f) in out {
            self.deliver(s, f);
        }
    }

    /// Subscribes to a user's inbox.
    pub fn subscribe_inbox(
        &mut self,
        session: SessionId,
        id: &str,
        tenant: &str,
        user: &str,
        max: usize,
    ) -> Result<(), SubError> {
        self.add_sub(
            session,
            id,
            SubKind::Inbox {
                tenant: tenant.to_string(),
                user: user.to_string(),
            },
            max,
        )?;
        self.inbox_subs
            .entry((tenant.to_string(), user.to_string()))
            .or_default()
            .push((session, id.to_string()));
        Ok(())
    }

    /// Sends frames built per inbox subscription of a user.
    pub fn publish_inbox(&mut self, tenant: &str, user: &str, build: &dyn Fn(&str) -> Vec<ServerFrame>) {
        let Some(subs) = self.inbox_subs.get(&(tenant.to_string(), user.to_string())) else {
            return;
        };
        let out: Vec<_> = subs
            .iter()
            .flat_map(|(s, id)| build(id).into_iter().map(move |f| (*s, f)))
            .collect();
        for (s, f) in out {
            self.deliver(s, f);
        }
    }

    /// Subscribes to presence in a tenant (None: every tenant), optionally one resource;
    /// returns who is online there now.
    pub fn subscribe_presence(
        &mut self,
        session: SessionId,
        id: &str,
        tenant: Option<&str>,
        resource: Option<&str>,
        max: usize,
    ) -> Result<Json, SubError> {
        self.add_sub(
            session,
            id,
            SubKind::Presence {
                tenant: tenant.map(String::from),
            },
            max,
        )?;
        self.presence_subs
            .entry(tenant.map(String::from))
            .or_default()
            .push(PresenceSub {
                session,
                id: id.to_string(),
                resource: resource.map(String::from),
            });
        Ok(self.online(tenant, resource))
    }

    /// Who is online in a tenant (None: all), optionally only on one resource.
    pub fn online(&self, tenant: Option<&str>, resource: Option<&str>) -> Json {
        let mut out = Vec::new();
        for (t, users) in &self.presence {
            if tenant.is_some_and(|want| want != t) {
                continue;
            }
            for (user, p) in users {
                if let Some((res, state)) = p.effective()
                    && resource.is_none_or(|want| want == res)
                {
                    out.push(serde_json::json!({
                        "tenant": t, "user": user, "resource": res, "state": state, "tabs": p.tabs.len(),
                    }));
                }
            }
        }
        out.sort_by(|a, b| a["user"].as_str().cmp(&b["user"].as_str()));
        serde_json::json!({ "online": out, "count": out.len() })
    }

    /// Users online, per tenant (for /metrics and the presence-count metric).
    pub fn online_counts(&self) -> HashMap<String, usize> {
        self.presence
            .iter()
            .map(|(t, u)| (t.clone(), u.values().filter(|p| !p.tabs.is_empty()).count()))
            .collect()
    }

    /// A heartbeat from one tab of a user.
    pub fn heartbeat(&mut self, session: SessionId, tenant: &str, user: &str, resource: &str, state: Json) {
        self.clock += 1;
        let at = self.clock;
        let users = self.presence.entry(tenant.to_string()).or_default();
        let p = users.entry(user.to_string()).or_default();
        let before: Effective = p.effective().map(|(r, s)| (r.to_string(), s.clone()));
        p.tabs.insert(
            session,
            Tab {
                resource: resource.to_string(),
                state,
                seen: Instant::now(),
                at,
            },
        );
        let after: Effective = p.effective().map(|(r, s)| (r.to_string(), s.clone()));
        self.presence_changed(tenant, user, before, after);
    }

    /// A session ended: its tabs leave.
    pub fn leave_session(&mut self, session: SessionId) {
        let mut changes = Vec::new();
        for (tenant, users) in self.presence.iter_mut() {
            for (user, p) in users.iter_mut() {
                if p.tabs.contains_key(&session) {
                    let before = p.effective().map(|(r, s)| (r.to_string(), s.clone()));
                    p.tabs.remove(&session);
                    let after = p.effective().map(|(r, s)| (r.to_string(), s.clone()));
                    changes.push((tenant.clone(), user.clone(), before, after));
                }
            }
        }
        self.apply_presence_changes(changes);
    }

    /// Removes every tab of one user in a tenant; returns how many there were.
    pub fn end_user_presence(&mut self, tenant: &str, user: &str) -> usize {
        let Some(p) = self.presence.get_mut(tenant).and_then(|u| u.get_mut(user)) else {
            return 0;
        };
        let before = p.effective().map(|(r, s)| (r.to_string(), s.clone()));
        let n = p.tabs.len();
        p.tabs.clear();
        self.apply_presence_changes(vec![(tenant.to_string(), user.to_string(), before, None)]);
        n
    }

    /// Starts keeping users' online/offline transitions for [`Hub::take_transitions`].
    pub fn record_presence(&mut self) {
        self.transitions.get_or_insert_with(Vec::new);
    }

    /// The transitions since the last call: `(tenant, user, online)`.
    pub fn take_transitions(&mut self) -> Vec<(String, String, bool)> {
        self.transitions.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Removes tabs silent for longer than `ttl`; returns how many.
    pub fn expire_presence(&mut self, ttl: std::time::Duration) -> usize {
        let now = Instant::now();
        let mut removed = 0;
        let mut changes = Vec::new();
        for (tenant, users) in self.presence.iter_mut() {
            for (user, p) in users.iter_mut() {
                if p.tabs.values().any(|t| now.duration_since(t.seen) > ttl) {
                    let before = p.effective().map(|(r, s)| (r.to_string(), s.clone()));
                    let had = p.tabs.len();
                    p.tabs.retain(|_, t| now.duration_since(t.seen) <= ttl);
                    removed += had - p.tabs.len();
                    let after = p.effective().map(|(r, s)| (r.to_string(), s.clone()));
                    changes.push((tenant.clone(), user.clone(), before, after));
                }
            }
        }
        self.apply_presence_changes(changes);
        removed
    }

    fn apply_presence_changes(&mut self, changes: Vec<(String, String, Effective, Effective)>) {
        for (tenant, user, before, after) in changes {
            self.presence_changed(&tenant, &user, before, after);
        }
        for users in self.presence.values_mut() {
            users.retain(|_, p| !p.tabs.is_empty());
        }
        self.presence.retain(|_, u| !u.is_empty());
    }

    fn presence_changed(&mut self, tenant: &str, user: &str, before: Effective, after: Effective) {
        if before == after {
            return;
        }
        if before.is_none() != after.is_none()
            && let Some(t) = self.transitions.as_mut()
        {
            t.push((tenant.to_string(), user.to_string(), after.is_some()));
        }
        let mut out = Vec::new();
        for key in [None, Some(tenant.to_string())] {
            let Some(subs) = self.presence_subs.get(&key) else {
                continue;
            };
            for sub in subs {
                // Seen through the subscription's resource: a user on another resource is
                // absent from it.
                let view = |e: &Effective| match (&sub.resource, e) {
                    (Some(want), Some((r, _))) if want != r => None,
                    (_, e) => e.clone(),
                };
                let (b, a) = (view(&before), view(&after));
                let (event, (resource, state)) = match (b, a) {
                    (None, Some(a)) => (PresenceEvent::Join, a),
                    (Some(_), Some(a)) if Some(&a) != view(&before).as_ref() => (PresenceEvent::Update, a),
                    (Some(b), None) => (PresenceEvent::Leave, b),
                    _ => continue,
                };
                out.push((
                    sub.session,
                    ServerFrame::Presence {
                        id: sub.id.clone(),
                        event,
                        user: user.to_string(),
                        resource,
                        state,
                    },
                ));
            }
        }
        for (s, f) in out {
            self.deliver(s, f);
        }
        let counts = self.online_counts();
        if before.is_some() != after.is_some() {
            let n = counts.get(tenant).copied().unwrap_or(0);
            self.publish_metric(ONLINE_METRIC, tenant, &Json::from(n));
        }
        let online: usize = counts.values().sum();
        metrics::gauge!("pulse_presence_online").set(online as f64);
    }

    /// Ends one subscription; false when there is none by that id.
    pub fn unsubscribe(&mut self, session: SessionId, id: &str) -> bool {
        let Some(kind) = self.subs.get_mut(&session).and_then(|s| s.remove(id)) else {
            return false;
        };
        self.remove_kind(session, id, kind);
        true
    }

    fn remove_kind(&mut self, session: SessionId, id: &str, kind: SubKind) {
        metrics::gauge!("pulse_subscriptions").decrement(1.0);
        let user = self.user_key(session);
        if let Some(n) = self.per_user.get_mut(&user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_user.remove(&user);
            }
        }
        let me = |m: &(SessionId, String)| m.0 == session && m.1 == id;
        self.take_pending(session, id);
        match kind {
            SubKind::Live { table, filter } => {
                let tenant = filter.tenant.as_ref().map(|(_, t)| t.clone());
                if let Some(groups) = self.live.get_mut(&table).and_then(|t| t.get_mut(&tenant)) {
                    for g in groups.iter_mut() {
                        g.members.retain(|m| !(m.session == session && m.id == id));
                    }
                    groups.retain(|g| !g.members.is_empty());
                }
            }
            SubKind::Metric { metric, tenant } => {
                if let Some(v) = self.metric_subs.get_mut(&(metric.clone(), tenant.clone())) {
                    v.retain(|m| !me(m));
                    if v.is_empty() {
                        self.metric_subs.remove(&(metric, tenant));
                    }
                }
            }
            SubKind::Inbox { tenant, user } => {
                if let Some(v) = self.inbox_subs.get_mut(&(tenant.clone(), user.clone())) {
                    v.retain(|m| !me(m));
                    if v.is_empty() {
                        self.inbox_subs.remove(&(tenant, user));
                    }
                }
            }
            SubKind::Presence { tenant } => {
                if let Some(v) = self.presence_subs.get_mut(&tenant) {
                    v.retain(|p| !(p.session == session && p.id == id));
                }
            }
        }
    }

    fn drop_subscriptions(&mut self, session: SessionId) {
        if let Some(subs) = self.subs.remove(&session) {
            for (id, kind) in subs {
                self.remove_kind(session, &id, kind);
            }
        }
    }

    /// A session ended: everything it held goes.
    pub fn remove_session(&mut self, session: SessionId) {
        self.drop_subscriptions(session);
        self.user_of.remove(&session);
        self.sessions.remove(&session);
        self.leave_session(session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, tenant: &str, status: &str) -> LiveRow {
        LiveRow {
            vals: [
                ("tenant_id".to_string(), Value::Text(tenant.into())),
                ("status".to_string(), Value::Text(status.into())),
            ]
            .into_iter()
            .collect(),
            key: serde_json::json!({ "id": id }),
            row: serde_json::json!({ "id": id, "status": status }),
        }
    }

    fn session(hub: &mut Hub, id: SessionId) -> mpsc::Receiver<Outgoing> {
        let (tx, rx) = mpsc::channel(16);
        hub.add_session(
            id,
            SessionHandle {
                tx,
                kill: CancellationToken::new(),
            },
        );
        rx
    }

    fn filter(tenant: &str, status: Option<&str>) -> RowFilter {
        RowFilter {
            tenant: Some(("tenant_id".into(), tenant.into())),
            owner: None,
            eq: status
                .map(|s| vec![("status".to_string(), Value::Text(s.into()))])
                .unwrap_or_default(),
        }
    }

    #[test]
    fn encoded_updates_fill_their_buffer_exactly() {
        let piece = |id: &str, n: u64| UpdatePiece {
            id: format!("{id:?}").into(),
            tail: format!(r#","cursor":"1-{n}","op":"insert","key":{{"id":{n}}},"row":{{"id":{n}}}}}"#)
                .into(),
        };
        for pieces in [
            vec![],
            vec![piece("a", 1)],
            vec![piece("a", 1), piece("b", 2), piece("a", 3)],
        ] {
            let text = encode_updates(&pieces);
            assert_eq!(text.len(), text.capacity(), "{text}");
            let frame: ServerFrame = serde_json::from_str(&text).expect("a server frame");
            match (pieces.len(), frame) {
                (1, ServerFrame::Update { .. }) => {}
                (n, ServerFrame::Updates { updates }) => assert_eq!(updates.len(), n),
                (n, other) => panic!("{n} pieces gave {other:?}"),
            }
        }
    }

    #[test]
    fn live_entries_queued_together_merge_into_one_frame_in_order() {
        let piece = |n: u64| UpdatePiece {
            id: r#""s""#.into(),
            tail: format!(r#","cursor":"1-{n}","op":"insert","key":{{"id":{n}}},"row":{{"id":{n}}}}}"#)
                .into(),
        };
        let live = |ns: &[u64]| {
            Outgoing::Live(Utf8Bytes::from(encode_updates(
                ns.iter().map(|&n| piece(n)).collect::<Vec<_>>(),
            )))
        };
        // A lone shared text goes out as it is.
        let lone = live(&[1]);
        let Outgoing::Live(ref text) = lone else {
            unreachable!()
        };
        let at = text.as_str().as_ptr();
        assert_eq!(merge_live(vec![lone]).as_str().as_ptr(), at);
        // A single update, pieces, an `updates` frame: one frame, every update in order.
        let run = vec![
            live(&[1]),
            Outgoing::Updates(vec![piece(2), piece(3)]),
            live(&[4, 5]),
            Outgoing::Updates(Vec::new()),
        ];
        let text = merge_live(run);
        let frame: ServerFrame = serde_json::from_str(text.as_str()).expect("one frame");
        let ServerFrame::Updates { updates } = frame else {
            panic!("not an updates frame: {text}");
        };
        let cursors: Vec<_> = updates
            .into_iter()
            .map(|u| match u {
                ServerFrame::Update { cursor, .. } => cursor.unwrap(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(cursors, ["1-1", "1-2", "1-3", "1-4", "1-5"]);
    }

    /// Every entry queued for the session so far.
    fn drain(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<Outgoing> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// The `update` frames the entries carry, in order, as (id, cursor, op, key id).
    fn updates_in(entries: Vec<Outgoing>) -> Vec<(String, String, UpdateOp, i64)> {
        let frames = entries.into_iter().flat_map(|e| match e.into_frame() {
            ServerFrame::Updates { updates } => updates,
            other => vec![other],
        });
        frames
            .filter_map(|f| match f {
                ServerFrame::Update {
                    id, cursor, op, key, ..
                } => Some((id, cursor.unwrap(), op, key["id"].as_i64().unwrap())),
                _ => None,
            })
            .collect()
    }

    fn ops(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<(UpdateOp, i64)> {
        updates_in(drain(rx))
            .into_iter()
            .map(|(_, _, op, key)| (op, key))
            .collect()
    }

    #[test]
    fn rows_move_in_and_out_of_filters_and_tenants_stay_apart() {
        let mut hub = Hub::new(100, 1);
        let mut a = session(&mut hub, 1);
        let mut b = session(&mut hub, 2);
        hub.subscribe_live(1, "s", "m", filter("t1", Some("active")), 10)
            .unwrap();
        hub.complete(1, "s", ServerFrame::Pong { nonce: 0 });
        hub.subscribe_live(2, "s", "m", filter("t2", None), 10).unwrap();
        hub.complete(2, "s", ServerFrame::Pong { nonce: 0 });
        hub.publish_live("m", "tenant_id", None, Some(row(1, "t1", "active")));
        hub.publish_live(
            "m",
            "tenant_id",
            Some(row(1, "t1", "active")),
            Some(row(1, "t1", "gone")),
        );
        hub.publish_live(
            "m",
            "tenant_id",
            Some(row(1, "t1", "gone")),
            Some(row(1, "t1", "active")),
        );
        hub.publish_live("m", "tenant_id", None, Some(row(2, "t1", "gone")));
        hub.publish_live("m", "tenant_id", Some(row(1, "t1", "active")), None);
        assert_eq!(
            ops(&mut a),
            vec![
                (UpdateOp::Insert, 1),
                (UpdateOp::Delete, 1),
                (UpdateOp::Insert, 1),
                (UpdateOp::Delete, 1)
            ]
        );
        assert!(ops(&mut b).is_empty(), "t2 saw t1's rows");
    }

    #[test]
    fn pre_serialized_updates_equal_the_frame_with_awkward_ids() {
        let mut hub = Hub::new(10, 1);
        let mut rx = session(&mut hub, 1);
        let id = "quote\" back\\ slash \u{1}";
        hub.subscribe_live(1, id, "m", filter("t1", None), 10).unwrap();
        hub.complete(1, id, ServerFrame::Pong { nonce: 0 });
        let _ = rx.try_recv();
        hub.publish_live("m", "tenant_id", None, Some(row(9, "t1", "ok")));
        let text = rx.try_recv().unwrap().into_text();
        let expected = ServerFrame::Update {
            id: id.to_string(),
            cursor: Some(hub.current_cursor()),
            op: UpdateOp::Insert,
            key: serde_json::json!({ "id": 9 }),
            row: Some(serde_json::json!({ "id": 9, "status": "ok" })),
        };
        assert_eq!(text, serde_json::to_string(&expected).unwrap());
    }

    #[test]
    fn delivery_latency_is_noted_only_for_commits_that_reached_someone_and_once_they_are_out() {
        let mut hub = Hub::new(100, 1);
        let mut a = session(&mut hub, 1);
        hub.subscribe_live(1, "s", "m", filter("t1", None), 10).unwrap();
        hub.complete(1, "s", ServerFrame::Pong { nonce: 0 });
        let _ = a.try_recv();
        let t = std::time::SystemTime::now();
        // Another tenant's row reaches nobody: no sample.
        hub.stage_live("m", "tenant_id", None, Some(row(1, "t2", "x")));
        hub.staged_commit(t);
        assert!(hub.staged_commits.is_empty());
        // Two commits staged, then taken along by another frame: recorded then.
        hub.stage_live("m", "tenant_id", None, Some(row(2, "t1", "x")));
        hub.staged_commit(t);
        hub.stage_live("m", "tenant_id", None, Some(row(3, "t1", "x")));
        hub.staged_commit(t);
        assert_eq!(hub.staged_commits.len(), 2);
        hub.deliver(1, ServerFrame::Pong { nonce: 1 });
        assert!(
            hub.staged_commits.is_empty(),
            "recorded when the updates went out"
        );
        // A commit whose updates a truncate already flushed is recorded at once.
        hub.stage_live("m", "tenant_id", None, Some(row(4, "t1", "x")));
        hub.resnapshot_table("m");
        hub.staged_commit(t);
        assert!(hub.staged_commits.is_empty());
        // And a plain flush records what it sends.
        hub.stage_live("m", "tenant_id", None, Some(row(5, "t1", "x")));
        hub.staged_commit(t);
        hub.flush_live();
        assert!(hub.staged_commits.is_empty());
    }

    #[test]
    fn live_updates_wait_for_their_window_and_never_overtake_a_later_frame() {
        let mut hub = Hub::new(100, 1);
        let mut a = session(&mut hub, 1);
        hub.subscribe_live(1, "s", "m", filter("t1", None), 10).unwrap();
        hub.complete(1, "s", ServerFrame::Pong { nonce: 0 });
        let _ = a.try_recv();
        // One session: the pause is 1/FULL_WINDOW_REACH of the window (here 50 ms).
        let window = Duration::from_millis(50) * FULL_WINDOW_REACH as u32;
        let pause = live_pause(window, 1);
        assert_eq!(pause, Duration::from_millis(50));
        let t0 = Instant::now();
        // Nothing sent yet: the first change goes out at once.
        hub.stage_live("m", "tenant_id", None, Some(row(1, "t1", "x")));
        assert_eq!(hub.flush_live_within(t0, window), None);
        assert_eq!(ops(&mut a), vec![(UpdateOp::Insert, 1)]);
        // Within the pause: staged, due at its end.
        hub.stage_live("m", "tenant_id", None, Some(row(2, "t1", "x")));
        let due = hub.flush_live_within(Instant::now(), window).expect("waits");
        assert!(due > Instant::now() && due <= Instant::now() + pause);
        hub.stage_live("m", "tenant_id", None, Some(row(3, "t1", "x")));
        assert!(hub.flush_live_within(Instant::now(), window).is_some());
        assert!(a.try_recv().is_err(), "sent before its pause ended");
        // A frame for the session takes the older staged updates along, first.
        hub.deliver(1, ServerFrame::Pong { nonce: 7 });
        assert!(matches!(
            a.try_recv().unwrap().into_frame(),
            ServerFrame::Updates { updates } if updates.len() == 2
        ));
        assert!(matches!(
            a.try_recv().unwrap(),
            Outgoing::Frame(ServerFrame::Pong { nonce: 7 })
        ));
        assert_eq!(hub.live_due(window), None, "nothing left staged");
        // Once the pause is over, the next change goes out at once again.
        hub.stage_live("m", "tenant_id", None, Some(row(4, "t1", "x")));
        assert_eq!(hub.flush_live_within(Instant::now() + pause, window), None);
        assert_eq!(ops(&mut a), vec![(UpdateOp::Insert, 4)]);
    }

    #[test]
    fn the_pause_after_a_flush_grows_with_the_sessions_it_reached() {
        let window = Duration::from_millis(4);
        assert_eq!(live_pause(window, 0), Duration::ZERO);
        assert_eq!(live_pause(window, FULL_WINDOW_REACH / 4), window / 4);
        assert_eq!(live_pause(window, FULL_WINDOW_REACH), window);
        assert_eq!(live_pause(window, 10 * FULL_WINDOW_REACH), window);
        // A flush to more sessions than that is followed by the whole window.
        let mut hub = Hub::new(100, 1);
        let n = FULL_WINDOW_REACH as u64 + 10;
        let mut rxs: Vec<_> = (1..=n).map(|id| session(&mut hub, id)).collect();
        for id in 1..=n {
            hub.subscribe_live(id, "s", "m", filter("t1", None), 10).unwrap();
            hub.complete(id, "s", ServerFrame::Pong { nonce: 0 });
        }
        let window = Duration::from_secs(60);
        hub.stage_live("m", "tenant_id", None, Some(row(1, "t1", "x")));
        let before = Instant::now();
        assert_eq!(hub.flush_live_within(before, window), None);
        for rx in &mut rxs {
            let _ = rx.try_recv();
            assert_eq!(ops(rx), vec![(UpdateOp::Insert, 1)]);
        }
        hub.stage_live("m", "tenant_id", None, Some(row(2, "t1", "x")));
        let due = hub.live_due(window).expect("staged");
        assert!(
            due >= before + window,
            "the whole window after a flush to {n} sessions"
        );
    }

    #[test]
    fn a_batch_goes_out_as_one_entry_per_session_and_encodes_as_its_frames() {
        let mut hub = Hub::new(100, 1);
        let mut a = session(&mut hub, 1);
        let mut b = session(&mut hub, 2);
        for s in [1, 2] {
            hub.subscribe_live(s, "s", "m", filter("t1", None), 10).unwrap();
            hub.complete(s, "s", ServerFrame::Pong { nonce: 0 });
        }
        let _ = (a.try_recv(), b.try_recv());
        // b's second subscription is still reading its initial result.
        hub.subscribe_live(2, "late", "m", filter("t1", Some("active")), 10)
            .unwrap();
        let first = hub.current_cursor();
        for i in 1..=3 {
            hub.stage_live("m", "tenant_id", None, Some(row(i, "t1", "active")));
        }
        assert!(a.try_recv().is_err(), "staged updates left before the flush");
        hub.flush_live();
        let expected = |id: &str, from: u64| {
            (from..from + 3)
                .map(|n| ServerFrame::Update {
                    id: id.into(),
                    cursor: Some(format!("1-{n}")),
                    op: UpdateOp::Insert,
                    key: serde_json::json!({ "id": n }),
                    row: Some(serde_json::json!({ "id": n, "status": "active" })),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(first, "1-0");
        for rx in [&mut a, &mut b] {
            // The group's shared text for both: b's other subscription, still pending,
            // keeps its updates apart.
            let entry = rx.try_recv().unwrap();
            assert!(matches!(entry, Outgoing::Live(_)), "{entry:?}");
            assert_eq!(
                entry.into_text(),
                serde_json::to_string(&ServerFrame::Updates {
                    updates: expected("s", 1)
                })
                .unwrap()
            );
            assert!(rx.try_recv().is_err(), "more than one entry for the batch");
        }
        // The pending subscription gets its result first, then the batch, in order.
        hub.complete(2, "late", ServerFrame::Pong { nonce: 7 });
        assert_eq!(b.try_recv().unwrap().into_frame(), ServerFrame::Pong { nonce: 7 });
        assert_eq!(
            b.try_recv().unwrap().into_frame(),
            ServerFrame::Updates {
                updates: expected("late", 1)
            }
        );
        // A single update is a plain update frame.
        hub.publish_live("m", "tenant_id", None, Some(row(4, "t1", "gone")));
        assert!(matches!(
            a.try_recv().unwrap().into_frame(),
            ServerFrame::Update { id, .. } if id == "s"
        ));
    }

    /// Every update the entries carry, as (subscription id, position).
    fn positions(entries: Vec<Outgoing>) -> Vec<(String, u64)> {
        updates_in(entries)
            .into_iter()
            .map(|(id, cursor, _, _)| (id, cursor.split_once('-').unwrap().1.parse().unwrap()))
            .collect()
    }

    #[test]
    fn a_group_shares_one_encoded_frame_and_a_session_in_two_groups_keeps_position_order() {
        let mut hub = Hub::new(100, 1);
        let mut rxs: Vec<_> = (1..=4).map(|s| session(&mut hub, s)).collect();
        for s in 1..=4 {
            hub.subscribe_live(s, "all", "m", filter("t1", None), 10).unwrap();
            hub.complete(s, "all", ServerFrame::Pong { nonce: 0 });
        }
        // Session 3 also watches the active rows: two groups, interleaved positions.
        hub.subscribe_live(3, "active", "m", filter("t1", Some("active")), 10)
            .unwrap();
        hub.complete(3, "active", ServerFrame::Pong { nonce: 0 });
        // Session 4 subscribes twice to the same rows: twice in one group.
        hub.subscribe_live(4, "again", "m", filter("t1", None), 10)
            .unwrap();
        hub.complete(4, "again", ServerFrame::Pong { nonce: 0 });
        for rx in &mut rxs {
            while rx.try_recv().is_ok() {}
        }
        hub.stage_live("m", "tenant_id", None, Some(row(1, "t1", "active")));
        hub.stage_live("m", "tenant_id", None, Some(row(2, "t1", "idle")));
        hub.stage_live("m", "tenant_id", None, Some(row(3, "t1", "active")));
        hub.flush_live();
        let texts: Vec<_> = rxs[..2]
            .iter_mut()
            .map(|rx| match rx.try_recv().unwrap() {
                Outgoing::Live(t) => t,
                other => panic!("not shared: {other:?}"),
            })
            .collect();
        assert_eq!(
            texts[0].as_str().as_ptr(),
            texts[1].as_str().as_ptr(),
            "encoded once for the group"
        );
        let want = |v: &[(&str, u64)]| v.iter().map(|(i, s)| (i.to_string(), *s)).collect::<Vec<_>>();
        for (i, expected) in [
            (
                2,
                want(&[("all", 1), ("active", 1), ("all", 2), ("all", 3), ("active", 3)]),
            ),
            (
                3,
                want(&[
                    ("all", 1),
                    ("again", 1),
                    ("all", 2),
                    ("again", 2),
                    ("all", 3),
                    ("again", 3),
                ]),
            ),
        ] {
            let entries = drain(&mut rxs[i]);
            assert_eq!(entries.len(), 1, "one entry for both subscriptions");
            assert_eq!(positions(entries), expected);
        }
        for rx in &mut rxs[..2] {
            assert!(rx.try_recv().is_err());
        }
    }

    #[test]
    fn members_joining_between_staging_and_flush_get_only_later_updates_and_many_ids_still_arrive() {
        let mut hub = Hub::new(100, 1);
        let n = SHARED_IDS as u64 + 3;
        let mut rxs: Vec<_> = (1..=n).map(|s| session(&mut hub, s)).collect();
        // Each session its own subscription id: more ids than a flush shares frames for.
        for s in 1..n {
            let id = format!("sub{s}");
            hub.subscribe_live(s, &id, "m", filter("t1", None), 10).unwrap();
            hub.complete(s, &id, ServerFrame::Pong { nonce: 0 });
        }
        for rx in &mut rxs {
            while rx.try_recv().is_ok() {}
        }
        let before = hub.current_cursor();
        hub.stage_live("m", "tenant_id", None, Some(row(1, "t1", "x")));
        // The last session resumes from before that change while it is still staged: the
        // replay brings it, the flush must not bring it again.
        assert!(
            hub.resume_live(n, "late", "m", filter("t1", None), &before, 10)
                .unwrap()
        );
        hub.stage_live("m", "tenant_id", None, Some(row(2, "t1", "x")));
        hub.flush_live();
        for s in 1..n {
            let got = positions(drain(&mut rxs[s as usize - 1]));
            assert_eq!(got, vec![(format!("sub{s}"), 1), (format!("sub{s}"), 2)]);
        }
        assert_eq!(
            positions(drain(&mut rxs[n as usize - 1])),
            vec![("late".to_string(), 1), ("late".to_string(), 2)],
            "the replay, then only what came after it"
        );
    }

    #[test]
    fn resume_replays_exactly_the_missed_updates_or_asks_for_a_resnapshot() {
        let mut hub = Hub::new(3, 1);
        let _a = session(&mut hub, 1);
        let before = hub.current_cursor();
        for i in 1..=3 {
            hub.publish_live("m", "tenant_id", None, Some(row(i, "t1", "active")));
        }
        let mut b = session(&mut hub, 2);
        assert!(
            hub.resume_live(2, "s", "m", filter("t1", None), &before, 10)
                .unwrap()
        );
        assert_eq!(
            ops(&mut b),
            vec![
                (UpdateOp::Insert, 1),
                (UpdateOp::Insert, 2),
                (UpdateOp::Insert, 3)
            ]
        );
        hub.publish_live("m", "tenant_id", None, Some(row(4, "t1", "active")));
        assert_eq!(ops(&mut b), vec![(UpdateOp::Insert, 4)]);
        // History holds 3: a cursor from before update 1 is now too old.
        let mut c = session(&mut hub, 3);
        assert!(
            !hub.resume_live(3, "s", "m", filter("t1", None), &before, 10)
                .unwrap()
        );
        assert!(ops(&mut c).is_empty());
        // A cursor of another process is always too old.
        let _d = session(&mut hub, 4);
        assert!(
            !hub.resume_live(4, "s", "m", filter("t1", None), "ff-1", 10)
                .unwrap()
        );
    }

    #[test]
    fn online_transitions_are_recorded_once_per_user_and_ended_on_demand() {
        let mut hub = Hub::new(0, 1);
        hub.heartbeat(1, "t1", "alice", "/a", Json::Null);
        assert!(hub.take_transitions().is_empty(), "nothing kept until asked");
        hub.record_presence();
        hub.heartbeat(2, "t1", "bob", "/a", Json::Null);
        hub.heartbeat(3, "t1", "bob", "/b", Json::Null);
        assert_eq!(hub.take_transitions(), vec![("t1".into(), "bob".into(), true)]);
        hub.leave_session(2);
        assert!(hub.take_transitions().is_empty(), "bob is still online in a tab");
        assert_eq!(hub.end_user_presence("t1", "bob"), 1);
        assert_eq!(hub.end_user_presence("t1", "bob"), 0, "safe to repeat");
        assert_eq!(hub.take_transitions(), vec![("t1".into(), "bob".into(), false)]);
        assert_eq!(hub.online(Some("t1"), None)["count"], 1);
        assert_eq!(hub.expire_presence(std::time::Duration::ZERO), 1);
        assert_eq!(hub.take_transitions(), vec![("t1".into(), "alice".into(), false)]);
    }

    #[test]
    fn presence_counts_tabs_once_and_moves_are_updates() {
        let mut hub = Hub::new(0, 1);
        let mut watcher = session(&mut hub, 9);
        hub.subscribe_presence(9, "p", Some("t1"), None, 10).unwrap();
        let _tab1 = session(&mut hub, 1);
        let _tab2 = session(&mut hub, 2);
        hub.heartbeat(1, "t1", "alice", "/home", Json::Null);
        hub.heartbeat(2, "t1", "alice", "/home", Json::Null);
        hub.heartbeat(2, "t1", "alice", "/members", Json::Null);
        hub.remove_session(2);
        hub.remove_session(1);
        let events: Vec<_> = std::iter::from_fn(|| watcher.try_recv().ok())
            .map(|f| match f.into_frame() {
                ServerFrame::Presence { event, resource, .. } => (event, resource),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            events,
            vec![
                (PresenceEvent::Join, "/home".to_string()),
                (PresenceEvent::Update, "/members".to_string()),
                (PresenceEvent::Update, "/home".to_string()),
                (PresenceEvent::Leave, "/home".to_string()),
            ]
        );
        assert!(hub.online_counts().is_empty());
    }

    #[test]
    fn a_full_queue_cuts_only_that_client() {
        let mut hub = Hub::new(0, 1);
        let (tx, _rx_never_read) = mpsc::channel(1);
        let kill = CancellationToken::new();
        hub.add_session(
            1,
            SessionHandle {
                tx,
                kill: kill.clone(),
            },
        );
        let mut ok = session(&mut hub, 2);
        for s in [1, 2] {
            hub.subscribe_live(s, "s", "m", filter("t1", None), 10).unwrap();
            hub.complete(s, "s", ServerFrame::Pong { nonce: 0 });
        }
        let _ = ok.try_recv();
        for i in 0..5 {
            hub.publish_live("m", "tenant_id", None, Some(row(i, "t1", "x")));
        }
        assert!(kill.is_cancelled());
        assert_eq!(ops(&mut ok).len(), 5);
        assert_eq!(hub.session_count(), 1);
    }

    #[test]
    fn a_resume_whose_replay_cuts_the_client_leaves_no_membership_behind() {
        let mut hub = Hub::new(100, 1);
        let before = hub.current_cursor();
        for i in 1..=20 {
            hub.publish_live("m", "tenant_id", None, Some(row(i, "t1", "x")));
        }
        // A queue of 16: the replay of 20 updates cuts the session.
        let _rx = session(&mut hub, 1);
        assert!(
            hub.resume_live(1, "s", "m", filter("t1", None), &before, 10)
                .unwrap()
        );
        assert_eq!(hub.session_count(), 0, "cut by its replay");
        let members: usize = hub
            .live
            .values()
            .flat_map(|t| t.values().flatten())
            .map(|g| g.members.len())
            .sum();
        assert_eq!(members, 0, "its membership went with it");
        hub.publish_live("m", "tenant_id", None, Some(row(21, "t1", "x")));
        assert_eq!(hub.last_flush.map(|(_, reach)| reach), None, "nobody to reach");
    }
}
