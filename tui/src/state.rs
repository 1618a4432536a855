//! The console's model and its reducer: [`State`], [`Action`], [`update`].
//!
//! `update` is the only thing that changes the state. It does no I/O: what it wants done
//! (a request to pulsed, quitting) comes back as [`Effect`]s for the main loop to carry
//! out, so every key and every network event can be replayed in a unit test.

use std::collections::{HashMap, VecDeque};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use pulse_shared::admin::{
    AdminRequest, AdminResponse, ChangeEvent, ConfigEntry, ErrorGroup, JobsReport, LiveTableInfo, LogEntry,
    LogLevel, MetricsSample, NotificationItem, PresenceReport, ReplicationReport, SettingEntry, SettingKind,
    StatusReport, StorageReport, TableInfo, TableRows,
};
use pulse_shared::caps::{Capability, Decision, Principal, Role, Target, authorize};
use pulse_shared::{ErrorBody, ErrorCode};

/// Log events the console keeps.
pub const LOG_KEEP: usize = 5_000;
/// Samples each sparkline keeps (one a second).
pub const HISTORY: usize = 120;
/// After this long without an answer a poll is sent again.
pub const REQUEST_TIMEOUT_MS: i64 = 10_000;
/// Changes the data explorer's feed keeps (and holds while paused).
pub const FEED_KEEP: usize = 500;
/// Rows of a live table per page.
pub const PAGE_ROWS: u32 = 50;
/// Live tables are counted on the source database: at most this often.
pub const LIVE_COUNT_EVERY_MS: i64 = 10_000;
/// The window of the function-error rate.
pub const FUNCTION_WINDOW_MS: i64 = 60_000;

/// What the data explorer's right pane shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// A table of the `pulse` schema, by schema-qualified name.
    Pulse(String),
    /// A live table of the schema file, optionally one tenant's rows.
    Live {
        /// The live table's name.
        table: String,
        /// Only this tenant.
        tenant: Option<String>,
    },
}

/// One line of the data explorer's table list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataItem {
    /// `tables[i]`, a `pulse` table.
    Pulse(usize),
    /// `live[i]`, a live table (all tenants).
    Live(usize),
    /// `live[i].tenants[j]`, one tenant of a live table.
    LiveTenant(usize, usize),
}

/// The screens, in tab order; number keys 1–9 select them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Screen {
    /// Health, alerts, sparklines.
    Overview,
    /// Who is online.
    Presence,
    /// The notification feed.
    Notifications,
    /// Logs and error groups.
    Logs,
    /// Tables of the pulse schema and live tables.
    Data,
    /// Storage usage.
    Storage,
    /// Scheduled jobs and dead letters.
    Jobs,
    /// Replication slots.
    Replication,
    /// Platform settings and the effective config.
    Settings,
}

impl Screen {
    /// Every screen, in tab order.
    pub const ALL: [Screen; 9] = [
        Screen::Overview,
        Screen::Presence,
        Screen::Notifications,
        Screen::Logs,
        Screen::Data,
        Screen::Storage,
        Screen::Jobs,
        Screen::Replication,
        Screen::Settings,
    ];

    /// The tab title.
    pub const fn title(self) -> &'static str {
        match self {
            Screen::Overview => "Overview",
            Screen::Presence => "Presence",
            Screen::Notifications => "Notifications",
            Screen::Logs => "Logs",
            Screen::Data => "Data",
            Screen::Storage => "Storage",
            Screen::Jobs => "Jobs",
            Screen::Replication => "Replication",
            Screen::Settings => "Settings",
        }
    }

    /// Position in [`Screen::ALL`].
    pub fn index(self) -> usize {
        Screen::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// Data fetched from pulsed: the latest answer, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub struct Remote<T> {
    /// The latest answer (kept while a later request fails, so a blip does not blank the
    /// screen).
    pub data: Option<T>,
    /// The latest request's error, if it failed.
    pub error: Option<ErrorBody>,
    /// When `data` arrived, Unix ms.
    pub at_ms: i64,
}

impl<T> Default for Remote<T> {
    fn default() -> Self {
        Remote {
            data: None,
            error: None,
            at_ms: 0,
        }
    }
}

impl<T> Remote<T> {
    fn set(&mut self, data: T, now_ms: i64) {
        self.data = Some(data);
        self.error = None;
        self.at_ms = now_ms;
    }

    /// Whether the daemon said this subsystem is not there.
    pub fn unavailable(&self) -> Option<&ErrorBody> {
        self.error.as_ref().filter(|e| e.code == ErrorCode::Unavailable)
    }
}

/// The connection to pulsed, as the status bar shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum Conn {
    /// Dialling.
    Connecting {
        /// Attempts since the last success (1 is the first).
        attempt: u32,
    },
    /// Session open.
    Connected {
        /// pulsed's version.
        server_version: String,
        /// Roles of the session.
        roles: Vec<String>,
    },
    /// Lost; a retry is scheduled.
    Disconnected {
        /// Why.
        reason: String,
        /// Seconds until the next attempt.
        retry_in_secs: u64,
    },
}

/// What the network task reports.
#[derive(Debug, Clone, PartialEq)]
pub enum NetEvent {
    /// Dialling.
    Connecting {
        /// Attempt number.
        attempt: u32,
    },
    /// `welcome` received.
    Connected {
        /// pulsed's version.
        server_version: String,
        /// Roles of the session.
        roles: Vec<String>,
    },
    /// The session ended or could not open.
    Disconnected {
        /// Why.
        reason: String,
        /// Seconds until the next attempt.
        retry_in_secs: u64,
    },
    /// An answer to a request.
    Response {
        /// The request id.
        id: String,
        /// The answer.
        response: AdminResponse,
    },
    /// An error, for a request (`id`) or for the session.
    Error {
        /// The request id, if any.
        id: Option<String>,
        /// The error.
        error: ErrorBody,
    },
}

/// Everything that can happen to the console.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A key press.
    Key(KeyEvent),
    /// The clock: once a second; polls the current screen.
    Tick {
        /// Unix ms.
        now_ms: i64,
    },
    /// The terminal was resized (only a redraw).
    Resize,
    /// From the network task.
    Net(NetEvent),
}

/// What the reducer asks the main loop to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send a request to pulsed.
    Request {
        /// Correlates the answer: `<kind>#<n>`.
        id: String,
        /// The request.
        request: AdminRequest,
    },
    /// Leave.
    Quit,
}

/// An action waiting for the operator's yes.
#[derive(Debug, Clone, PartialEq)]
pub enum Pending {
    /// Change a setting.
    Setting {
        /// Stable key.
        key: String,
        /// Label, for the question.
        label: String,
        /// The value (not shown when secret).
        value: String,
        /// Whether the value is secret.
        secret: bool,
    },
    /// Rotate the deploy key.
    Rotate,
    /// Run a job now.
    RunJob(String),
    /// Requeue a dead letter.
    Requeue(String),
}

/// What keys do right now.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Navigation.
    Normal,
    /// Typing a filter for the current screen.
    Filter,
    /// Typing a new value for a setting.
    Edit {
        /// Stable key.
        key: String,
        /// Label.
        label: String,
        /// Kind of value.
        kind: SettingKind,
        /// What was typed.
        buffer: String,
    },
    /// A yes/no question.
    Confirm(Pending),
    /// A freshly rotated deploy key, shown this once.
    ShowKey(String),
    /// One log event in full (by sequence number).
    LogDetail(u64),
}

/// Severity of the status-bar message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Information.
    Info,
    /// A failure.
    Error,
}

/// Which part of a two-pane screen has the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pane {
    /// The left or upper list (tenants, tables, jobs, settings).
    #[default]
    First,
    /// The right or lower list (users, rows, dead letters, config).
    Second,
}

/// Sparkline history of the overview.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// Open sessions.
    pub connections: VecDeque<u64>,
    /// Errors per second.
    pub error_rate: VecDeque<u64>,
    /// Queries and mutations per second, when measured.
    pub throughput: Option<VecDeque<u64>>,
    /// Live query p50, ms, when measured.
    pub latency_ms: Option<VecDeque<u64>>,
    /// Largest slot lag, bytes.
    pub replication_lag: VecDeque<u64>,
    /// Function runs and failures over the last minute: (Unix ms, runs, failures),
    /// cumulative counters, oldest first.
    pub functions: VecDeque<(i64, u64, u64)>,
    /// Previous sample, for rates: (Unix ms, errors, throughput counter).
    prev: Option<(i64, u64, Option<u64>)>,
}

fn push(q: &mut VecDeque<u64>, v: u64) {
    if q.len() == HISTORY {
        q.pop_front();
    }
    q.push_back(v);
}

/// The whole console state.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// The screen shown.
    pub screen: Screen,
    /// What keys do.
    pub mode: Mode,
    /// The help overlay is open.
    pub help: bool,
    /// The connection.
    pub conn: Conn,
    /// Where we connect, for the status bar.
    pub endpoint: String,
    /// No settings capability: edits are refused before they are sent.
    pub read_only: bool,
    /// Whether the session may run jobs and requeue dead letters.
    pub can_run_jobs: bool,
    /// Whether colours are used (NO_COLOR unset).
    pub color: bool,
    /// The clock, Unix ms (from ticks, so rendering stays pure).
    pub now_ms: i64,
    /// A one-line message for the status bar.
    pub message: Option<(Tone, String)>,
    /// Filter text per screen.
    pub filters: [String; 9],
    /// Cursor per screen and pane.
    pub cursor: [[usize; 2]; 9],
    /// Focused pane per screen.
    pub pane: [Pane; 9],

    /// Health.
    pub status: Remote<StatusReport>,
    /// Latest counters.
    pub metrics: Remote<MetricsSample>,
    /// Sparklines.
    pub history: History,
    /// Effective config.
    pub config: Remote<Vec<ConfigEntry>>,
    /// Who is online.
    pub presence: Remote<PresenceReport>,
    /// The tenant chosen on the presence screen.
    pub presence_tenant: Option<String>,
    /// Indices of `presence.users` that pass the tenant and the filter (kept here so a
    /// frame with 10,000 users does not filter them again).
    pub presence_rows: Vec<usize>,
    /// The notification feed.
    pub notifications: Remote<Vec<NotificationItem>>,
    /// Kept log events, oldest first.
    pub logs: VecDeque<LogEntry>,
    /// Errors grouped by kind.
    pub log_errors: Remote<Vec<ErrorGroup>>,
    /// Highest sequence seen.
    pub log_seq: u64,
    /// Events pulsed dropped before we read them.
    pub log_dropped: u64,
    /// Lowest level shown.
    pub log_level: LogLevel,
    /// Error groups instead of the event list.
    pub log_groups: bool,
    /// Pulse schema tables.
    pub tables: Remote<Vec<TableInfo>>,
    /// Rows of the opened table.
    pub table_rows: Remote<TableRows>,
    /// The table opened.
    pub open_table: Option<Opened>,
    /// The page of the opened live table (rows skipped).
    pub data_offset: u32,
    /// Live tables of the schema file with their rows per tenant.
    pub live: Remote<Vec<LiveTableInfo>>,
    /// The latest committed changes, oldest first (at most [`FEED_KEEP`]).
    pub changes: VecDeque<ChangeEvent>,
    /// Changes that arrived while the feed is paused, oldest first.
    pub held: VecDeque<ChangeEvent>,
    /// The feed is paused: new changes are held, not shown.
    pub feed_paused: bool,
    /// Changes the feed never received (pulsed's ring moved on, or the console's).
    pub feed_missed: u64,
    /// Highest change sequence number seen, to resume the feed after a reconnect.
    pub feed_seq: u64,
    /// A feed watch is open on this session.
    pub watching: bool,
    /// The feed failed to start (no capability, or an old pulsed).
    pub feed_error: Option<ErrorBody>,
    /// Storage.
    pub storage: Remote<StorageReport>,
    /// Jobs.
    pub jobs: Remote<JobsReport>,
    /// Replication.
    pub replication: Remote<ReplicationReport>,
    /// Confirmed bytes per second over the last two samples, per slot.
    pub slot_rates: Vec<(String, u64)>,
    /// Previous confirmed positions: (Unix ms, slot, bytes).
    prev_slots: Vec<(i64, String, u64)>,
    /// Platform settings.
    pub settings: Remote<Vec<SettingEntry>>,

    /// Request kinds awaiting an answer, with when they were sent, so a slow daemon is
    /// not asked twice (an answer lost for [`REQUEST_TIMEOUT_MS`] no longer blocks).
    in_flight: HashMap<&'static str, i64>,
    /// Last request number.
    next_id: u64,
}

impl State {
    /// A fresh state for `endpoint`.
    pub fn new(endpoint: String, color: bool) -> State {
        State {
            screen: Screen::Overview,
            mode: Mode::Normal,
            help: false,
            conn: Conn::Connecting { attempt: 1 },
            endpoint,
            read_only: true,
            can_run_jobs: false,
            color,
            now_ms: 0,
            message: None,
            filters: Default::default(),
            cursor: [[0; 2]; 9],
            pane: [Pane::First; 9],
            status: Remote::default(),
            metrics: Remote::default(),
            history: History::default(),
            config: Remote::default(),
            presence: Remote::default(),
            presence_tenant: None,
            presence_rows: Vec::new(),
            notifications: Remote::default(),
            logs: VecDeque::new(),
            log_errors: Remote::default(),
            log_seq: 0,
            log_dropped: 0,
            log_level: LogLevel::Info,
            log_groups: false,
            tables: Remote::default(),
            table_rows: Remote::default(),
            open_table: None,
            data_offset: 0,
            live: Remote::default(),
            changes: VecDeque::new(),
            held: VecDeque::new(),
            feed_paused: false,
            feed_missed: 0,
            feed_seq: 0,
            watching: false,
            feed_error: None,
            storage: Remote::default(),
            jobs: Remote::default(),
            replication: Remote::default(),
            slot_rates: Vec::new(),
            prev_slots: Vec::new(),
            settings: Remote::default(),
            in_flight: HashMap::new(),
            next_id: 0,
        }
    }

    /// The filter of the current screen.
    pub fn filter(&self) -> &str {
        &self.filters[self.screen.index()]
    }

    /// The focused pane of the current screen.
    pub fn focus(&self) -> Pane {
        self.pane[self.screen.index()]
    }

    /// The cursor of a screen's pane.
    pub fn cursor_of(&self, screen: Screen, pane: Pane) -> usize {
        self.cursor[screen.index()][pane as usize]
    }

    /// Whether the session is open.
    pub fn connected(&self) -> bool {
        matches!(self.conn, Conn::Connected { .. })
    }

    /// Tenants on the presence screen: "all" first, then each tenant.
    pub fn presence_tenants(&self) -> Vec<(Option<String>, u64)> {
        let mut out = Vec::new();
        if let Some(p) = &self.presence.data {
            out.push((None, p.tenants.iter().map(|t| t.online).sum()));
            out.extend(p.tenants.iter().map(|t| (Some(t.tenant.clone()), t.online)));
        }
        out
    }

    /// Log events that pass the level and the filter, oldest first.
    pub fn visible_logs(&self) -> Vec<&LogEntry> {
        let needle = self.filters[Screen::Logs.index()].to_lowercase();
        self.logs
            .iter()
            .filter(|e| e.level >= self.log_level)
            .filter(|e| needle.is_empty() || log_line_matches(e, &needle))
            .collect()
    }

    /// Notifications that pass the filter.
    pub fn visible_notifications(&self) -> Vec<&NotificationItem> {
        let needle = self.filters[Screen::Notifications.index()].to_lowercase();
        self.notifications
            .data
            .iter()
            .flatten()
            .filter(|n| {
                needle.is_empty()
                    || n.tenant.to_lowercase().contains(&needle)
                    || n.user.to_lowercase().contains(&needle)
                    || n.title.to_lowercase().contains(&needle)
            })
            .collect()
    }

    /// Config entries that pass the settings screen's filter.
    pub fn visible_config(&self) -> Vec<&ConfigEntry> {
        let needle = self.filters[Screen::Settings.index()].to_lowercase();
        self.config
            .data
            .iter()
            .flatten()
            .filter(|c| needle.is_empty() || c.key.to_lowercase().contains(&needle))
            .collect()
    }

    /// Tables that pass the data screen's filter.
    pub fn visible_tables(&self) -> Vec<&TableInfo> {
        let needle = self.filters[Screen::Data.index()].to_lowercase();
        self.tables
            .data
            .iter()
            .flatten()
            .filter(|t| needle.is_empty() || t.name.to_lowercase().contains(&needle))
            .collect()
    }

    /// The data explorer's list: `pulse` tables, then each live table followed by its
    /// tenants, all through the filter (a live table matching by name keeps all its
    /// tenants; otherwise only matching tenants show, under their table).
    pub fn data_items(&self) -> Vec<DataItem> {
        let needle = self.filters[Screen::Data.index()].to_lowercase();
        let hit = |text: &str| needle.is_empty() || text.to_lowercase().contains(&needle);
        let mut items = Vec::new();
        for (i, t) in self.tables.data.iter().flatten().enumerate() {
            if hit(&t.name) {
                items.push(DataItem::Pulse(i));
            }
        }
        for (i, t) in self.live.data.iter().flatten().enumerate() {
            let whole = hit(&t.name) || hit(&t.source);
            let tenants: Vec<usize> = (0..t.tenants.len())
                .filter(|&j| whole || hit(&t.tenants[j].tenant))
                .collect();
            if whole || !tenants.is_empty() {
                items.push(DataItem::Live(i));
                items.extend(tenants.into_iter().map(|j| DataItem::LiveTenant(i, j)));
            }
        }
        items
    }

    /// The feed's changes that pass the data screen's filter, oldest first.
    pub fn visible_changes(&self) -> Vec<&ChangeEvent> {
        let needle = self.filters[Screen::Data.index()].to_lowercase();
        self.changes
            .iter()
            .filter(|c| {
                needle.is_empty()
                    || c.table.to_lowercase().contains(&needle)
                    || c.op.contains(&needle)
                    || c.key.to_lowercase().contains(&needle)
                    || c.columns.iter().any(|(k, v)| {
                        k.to_lowercase().contains(&needle) || v.to_lowercase().contains(&needle)
                    })
            })
            .collect()
    }

    /// Function errors (failed queries, mutations and job runs) as a percentage of the
    /// runs over the last minute; 0 when nothing ran; `None` when pulsed does not count
    /// them.
    pub fn function_error_pct(&self) -> Option<f64> {
        let q = &self.history.functions;
        let (first, last) = (q.front()?, q.back()?);
        let runs = last.1.saturating_sub(first.1);
        let failed = last.2.saturating_sub(first.2);
        Some(if runs == 0 {
            0.0
        } else {
            failed as f64 * 100.0 / runs as f64
        })
    }

    fn recompute_presence(&mut self) {
        self.presence_rows.clear();
        let Some(p) = &self.presence.data else { return };
        let needle = self.filters[Screen::Presence.index()].to_lowercase();
        for (i, u) in p.users.iter().enumerate() {
            if let Some(t) = &self.presence_tenant
                && &u.tenant != t
            {
                continue;
            }
            if !needle.is_empty()
                && !u.user.to_lowercase().contains(&needle)
                && !u.resource.to_lowercase().contains(&needle)
                && !u.tenant.to_lowercase().contains(&needle)
            {
                continue;
            }
            self.presence_rows.push(i);
        }
    }

    /// How many rows a screen's list has (for cursor bounds).
    fn list_len(&self, screen: Screen, pane: Pane) -> usize {
        match (screen, pane) {
            (Screen::Overview, _) => self.status.data.as_ref().map_or(0, |s| s.components.len()),
            (Screen::Presence, Pane::First) => self.presence_tenants().len(),
            (Screen::Presence, Pane::Second) => self.presence_rows.len(),
            (Screen::Notifications, _) => self.visible_notifications().len(),
            (Screen::Logs, _) if self.log_groups => self.log_errors.data.as_ref().map_or(0, Vec::len),
            (Screen::Logs, _) => self.visible_logs().len(),
            (Screen::Data, Pane::First) => self.data_items().len(),
            (Screen::Data, Pane::Second) => self.table_rows.data.as_ref().map_or(0, |t| t.rows.len()),
            (Screen::Storage, _) => self.storage.data.as_ref().map_or(0, |s| s.tenants.len()),
            (Screen::Jobs, Pane::First) => self.jobs.data.as_ref().map_or(0, |j| j.jobs.len()),
            (Screen::Jobs, Pane::Second) => self.jobs.data.as_ref().map_or(0, |j| j.dead_letters.len()),
            (Screen::Replication, _) => self.replication.data.as_ref().map_or(0, |r| r.slots.len()),
            (Screen::Settings, Pane::First) => self.settings.data.as_ref().map_or(0, Vec::len),
            (Screen::Settings, Pane::Second) => self.visible_config().len(),
        }
    }

    fn cursor_mut(&mut self) -> &mut usize {
        let pane = self.focus() as usize;
        &mut self.cursor[self.screen.index()][pane]
    }

    fn clamp_cursors(&mut self) {
        for screen in Screen::ALL {
            for pane in [Pane::First, Pane::Second] {
                let len = self.list_len(screen, pane);
                let c = &mut self.cursor[screen.index()][pane as usize];
                *c = (*c).min(len.saturating_sub(1));
            }
        }
    }

    fn request(&mut self, request: AdminRequest, effects: &mut Vec<Effect>) {
        let kind = kind_of(&request);
        // Actions always go out; polls wait for the previous answer.
        let is_poll = !matches!(
            request,
            AdminRequest::UpdateSetting { .. }
                | AdminRequest::RotateDeployKey
                | AdminRequest::RunJob { .. }
                | AdminRequest::RequeueDeadLetter { .. }
                | AdminRequest::WatchChanges { .. }
                | AdminRequest::UnwatchChanges
        );
        if !self.connected() {
            return;
        }
        if is_poll
            && let Some(sent) = self.in_flight.get(kind)
            && self.now_ms - sent < REQUEST_TIMEOUT_MS
        {
            return;
        }
        self.in_flight.insert(kind, self.now_ms);
        self.next_id += 1;
        effects.push(Effect::Request {
            id: format!("{kind}#{}", self.next_id),
            request,
        });
    }

    /// Asks for what the current screen shows (and what the overview's sparklines need).
    fn poll(&mut self, effects: &mut Vec<Effect>) {
        self.request(AdminRequest::Status, effects);
        self.request(AdminRequest::Metrics, effects);
        self.request(AdminRequest::Replication, effects);
        self.request(
            AdminRequest::Logs {
                after: self.log_seq,
                limit: 1000,
            },
            effects,
        );
        match self.screen {
            Screen::Overview | Screen::Logs | Screen::Replication => {}
            Screen::Presence => self.request(
                AdminRequest::Presence {
                    tenant: self.presence_tenant.clone(),
                },
                effects,
            ),
            Screen::Notifications => self.request(
                AdminRequest::Notifications {
                    tenant: None,
                    user: None,
                    limit: 200,
                },
                effects,
            ),
            Screen::Data => {
                self.request(AdminRequest::Tables, effects);
                // Counting live tables reads the source database: not every second.
                if self.live.data.is_none() || self.now_ms - self.live.at_ms >= LIVE_COUNT_EVERY_MS {
                    self.request(AdminRequest::LiveTables, effects);
                }
                if let Some(request) = self.rows_request() {
                    self.request(request, effects);
                }
                self.watch(effects);
            }
            Screen::Storage => self.request(AdminRequest::Storage, effects),
            Screen::Jobs => self.request(AdminRequest::Jobs, effects),
            Screen::Settings => {
                self.request(AdminRequest::Settings, effects);
                self.request(AdminRequest::Config, effects);
            }
        }
    }

    fn say(&mut self, tone: Tone, text: impl Into<String>) {
        self.message = Some((tone, text.into()));
    }

    /// The request for the rows of the opened table.
    fn rows_request(&self) -> Option<AdminRequest> {
        Some(match self.open_table.clone()? {
            Opened::Pulse(table) => AdminRequest::TableRows { table, limit: 50 },
            Opened::Live { table, tenant } => AdminRequest::LiveRows {
                table,
                tenant,
                offset: self.data_offset,
                limit: PAGE_ROWS,
            },
        })
    }

    /// Opens the change feed on this session, once (pulsed then pushes each commit),
    /// from where the console left off.
    fn watch(&mut self, effects: &mut Vec<Effect>) {
        if !self.watching && self.feed_error.is_none() && self.connected() {
            self.watching = true;
            self.request(AdminRequest::WatchChanges { after: self.feed_seq }, effects);
        }
    }

    /// Takes changes from pulsed: shown at once, or held while paused.
    fn changes_arrived(&mut self, changes: Vec<ChangeEvent>, missed: u64) {
        self.feed_missed += missed;
        for c in changes {
            self.feed_seq = self.feed_seq.max(c.seq);
            let into = if self.feed_paused {
                &mut self.held
            } else {
                &mut self.changes
            };
            if into.len() == FEED_KEEP {
                into.pop_front();
                if self.feed_paused {
                    self.feed_missed += 1;
                }
            }
            into.push_back(c);
        }
    }
}

fn log_line_matches(e: &LogEntry, needle: &str) -> bool {
    e.message.to_lowercase().contains(needle)
        || e.target.to_lowercase().contains(needle)
        || e.fields
            .iter()
            .any(|(k, v)| k.to_lowercase().contains(needle) || v.to_lowercase().contains(needle))
}

/// The kind name of a request: the first part of its id.
pub fn kind_of(request: &AdminRequest) -> &'static str {
    match request {
        AdminRequest::Status => "status",
        AdminRequest::Config => "config",
        AdminRequest::Metrics => "metrics",
        AdminRequest::Logs { .. } => "logs",
        AdminRequest::Tables => "tables",
        AdminRequest::TableRows { .. } => "table_rows",
        AdminRequest::LiveTables => "live_tables",
        AdminRequest::LiveRows { .. } => "live_rows",
        AdminRequest::WatchChanges { .. } => "watch_changes",
        AdminRequest::UnwatchChanges => "unwatch_changes",
        AdminRequest::Replication => "replication",
        AdminRequest::Presence { .. } => "presence",
        AdminRequest::Notifications { .. } => "notifications",
        AdminRequest::Storage => "storage",
        AdminRequest::Jobs => "jobs",
        AdminRequest::RunJob { .. } => "run_job",
        AdminRequest::RequeueDeadLetter { .. } => "requeue",
        AdminRequest::Settings => "settings",
        AdminRequest::UpdateSetting { .. } => "update_setting",
        AdminRequest::RotateDeployKey => "rotate",
    }
}

const KINDS: [&str; 20] = [
    "status",
    "config",
    "metrics",
    "logs",
    "tables",
    "table_rows",
    "live_tables",
    "live_rows",
    "watch_changes",
    "unwatch_changes",
    "replication",
    "presence",
    "notifications",
    "storage",
    "jobs",
    "run_job",
    "requeue",
    "settings",
    "update_setting",
    "rotate",
];

fn kind_of_id(id: &str) -> Option<&'static str> {
    let prefix = id.split('#').next()?;
    KINDS.into_iter().find(|k| *k == prefix)
}

/// Checks a setting value as pulsed will, so a typo is caught before the confirmation.
/// pulsed validates again; this only saves a round trip.
pub fn validate_setting(kind: SettingKind, raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    match kind {
        SettingKind::Url => {
            let rest = raw
                .strip_prefix("https://")
                .or_else(|| raw.strip_prefix("http://"))
                .ok_or("expected an http:// or https:// URL")?;
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            if host.is_empty() || host.contains(' ') {
                return Err("expected an http:// or https:// URL with a host".into());
            }
            Ok(raw.to_string())
        }
        SettingKind::Secret => {
            if raw.len() >= 32 && raw.chars().all(|c| c.is_ascii_graphic()) {
                Ok(raw.to_string())
            } else {
                Err("expected at least 32 printable characters without spaces".into())
            }
        }
        SettingKind::Toggle => match raw.to_ascii_lowercase().as_str() {
            "true" | "on" | "yes" | "1" => Ok("true".into()),
            "false" | "off" | "no" | "0" => Ok("false".into()),
            _ => Err("expected true or false".into()),
        },
        SettingKind::Millis => match raw.parse::<u64>() {
            Ok(n) if (100..=3_600_000).contains(&n) => Ok(n.to_string()),
            _ => Err("expected a whole number of milliseconds from 100 to 3600000".into()),
        },
    }
}

/// Parses an LSN `X/Y` into bytes.
pub fn lsn_bytes(lsn: &str) -> Option<u64> {
    let (hi, lo) = lsn.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The reducer.
pub fn update(state: &mut State, action: Action) -> Vec<Effect> {
    let mut effects = Vec::new();
    match action {
        Action::Resize => {}
        Action::Tick { now_ms } => {
            state.now_ms = now_ms;
            state.poll(&mut effects);
        }
        Action::Net(event) => net(state, event, &mut effects),
        Action::Key(key) => key_press(state, key, &mut effects),
    }
    effects
}

fn net(state: &mut State, event: NetEvent, effects: &mut Vec<Effect>) {
    match event {
        NetEvent::Connecting { attempt } => state.conn = Conn::Connecting { attempt },
        NetEvent::Connected {
            server_version,
            roles,
        } => {
            let principal = Principal {
                user: None,
                tenant: None,
                roles: roles.iter().filter_map(|r| Role::parse(r)).collect(),
            };
            let may = |cap| {
                matches!(
                    authorize(&principal, cap, &Target::default()),
                    Decision::Allowed(_)
                )
            };
            state.read_only = !may(Capability::ManageSettings);
            state.can_run_jobs = may(Capability::RunJob);
            state.conn = Conn::Connected {
                server_version,
                roles,
            };
            state.in_flight.clear();
            // pulsed may have restarted and numbers its log events from 1 again: take its
            // whole buffer afresh rather than wait for the old numbers.
            state.logs.clear();
            state.log_seq = 0;
            state.log_dropped = 0;
            state.poll(effects);
        }
        NetEvent::Disconnected {
            reason,
            retry_in_secs,
        } => {
            state.conn = Conn::Disconnected {
                reason,
                retry_in_secs,
            };
            state.in_flight.clear();
            // A watch lives as long as its session.
            state.watching = false;
        }
        NetEvent::Response { id, response } => {
            let kind = kind_of_id(&id);
            if let Some(kind) = kind {
                state.in_flight.remove(kind);
            }
            if kind == Some("unwatch_changes") {
                // Nothing to tell: the operator left the screen.
                return;
            }
            response_arrived(state, response, effects);
            state.clamp_cursors();
        }
        NetEvent::Error { id, error } => {
            let kind = id.as_deref().and_then(kind_of_id);
            if let Some(kind) = kind {
                state.in_flight.remove(kind);
            }
            let put = |r: &mut Option<ErrorBody>| *r = Some(error.clone());
            match kind {
                Some("status") => put(&mut state.status.error),
                Some("metrics") => put(&mut state.metrics.error),
                Some("config") => put(&mut state.config.error),
                Some("logs") => put(&mut state.log_errors.error),
                Some("tables") => put(&mut state.tables.error),
                Some("table_rows" | "live_rows") => put(&mut state.table_rows.error),
                Some("live_tables") => put(&mut state.live.error),
                Some("watch_changes") => {
                    state.watching = false;
                    state.feed_error = Some(error.clone());
                }
                Some("unwatch_changes") => {}
                Some("replication") => put(&mut state.replication.error),
                Some("presence") => put(&mut state.presence.error),
                Some("notifications") => put(&mut state.notifications.error),
                Some("storage") => put(&mut state.storage.error),
                Some("jobs") => put(&mut state.jobs.error),
                Some("settings") => put(&mut state.settings.error),
                // Actions (edits, runs) and session errors go to the status bar.
                _ => state.say(Tone::Error, format!("{}: {}", error.code, error.message)),
            }
        }
    }
}

fn response_arrived(state: &mut State, response: AdminResponse, effects: &mut Vec<Effect>) {
    let now = state.now_ms;
    match response {
        AdminResponse::Status(s) => state.status.set(s, now),
        AdminResponse::Metrics(m) => {
            let h = &mut state.history;
            if let (Some(runs), Some(failed)) = (m.functions_total, m.function_errors_total) {
                // A restarted pulsed counts from 0 again: start the window over.
                if h.functions
                    .back()
                    .is_some_and(|(_, r, f)| runs < *r || failed < *f)
                {
                    h.functions.clear();
                }
                h.functions.push_back((now, runs, failed));
                while h
                    .functions
                    .front()
                    .is_some_and(|(at, _, _)| now - at > FUNCTION_WINDOW_MS)
                {
                    h.functions.pop_front();
                }
            } else {
                h.functions.clear();
            }
            push(&mut h.connections, m.connections);
            let throughput_counter = m.requests_total;
            if let Some((at, errors, prev_thr)) = h.prev {
                let secs = ((now - at).max(1) as f64) / 1000.0;
                push(
                    &mut h.error_rate,
                    (m.errors_total.saturating_sub(errors) as f64 / secs).round() as u64,
                );
                if let (Some(cur), Some(prev)) = (throughput_counter, prev_thr) {
                    let q = h.throughput.get_or_insert_with(VecDeque::new);
                    push(q, (cur.saturating_sub(prev) as f64 / secs).round() as u64);
                }
            }
            if let Some(p50) = m.query_p50_ms {
                push(h.latency_ms.get_or_insert_with(VecDeque::new), p50.round() as u64);
            }
            h.prev = Some((now, m.errors_total, throughput_counter));
            state.metrics.set(m, now);
        }
        AdminResponse::Config { entries } => state.config.set(entries, now),
        AdminResponse::Logs(page) => {
            // Follow the tail while the cursor is on the last line.
            let before = state.list_len(Screen::Logs, Pane::First);
            let follow = state.cursor_of(Screen::Logs, Pane::First) + 1 >= before;
            state.log_dropped += page.dropped;
            for e in page.entries {
                state.log_seq = state.log_seq.max(e.seq);
                if state.logs.len() == LOG_KEEP {
                    state.logs.pop_front();
                }
                state.logs.push_back(e);
            }
            state.log_errors.set(page.errors, now);
            if follow && !state.log_groups {
                state.cursor[Screen::Logs.index()][0] =
                    state.list_len(Screen::Logs, Pane::First).saturating_sub(1);
            }
        }
        AdminResponse::Tables { tables } => state.tables.set(tables, now),
        AdminResponse::TableRows(rows) => state.table_rows.set(rows, now),
        AdminResponse::LiveTables { tables } => state.live.set(tables, now),
        AdminResponse::Changes { changes, missed } => state.changes_arrived(changes, missed),
        AdminResponse::Replication(r) => {
            let mut rates = Vec::new();
            let mut next = Vec::new();
            for slot in &r.slots {
                let Some(pos) = slot.confirmed_flush_lsn.as_deref().and_then(lsn_bytes) else {
                    continue;
                };
                if let Some((at, _, prev)) = state.prev_slots.iter().find(|(_, n, _)| *n == slot.name) {
                    let secs = ((now - at).max(1) as f64) / 1000.0;
                    rates.push((
                        slot.name.clone(),
                        (pos.saturating_sub(*prev) as f64 / secs) as u64,
                    ));
                }
                next.push((now, slot.name.clone(), pos));
            }
            state.prev_slots = next;
            state.slot_rates = rates;
            let lag = r
                .slots
                .iter()
                .filter_map(|s| s.lag_bytes)
                .max()
                .unwrap_or(0)
                .max(0) as u64;
            push(&mut state.history.replication_lag, lag);
            state.replication.set(r, now);
        }
        AdminResponse::Presence(p) => {
            state.presence.set(p, now);
            state.recompute_presence();
        }
        AdminResponse::Notifications { items } => state.notifications.set(items, now),
        AdminResponse::Storage(s) => state.storage.set(s, now),
        AdminResponse::Jobs(j) => state.jobs.set(j, now),
        AdminResponse::Settings { settings } => state.settings.set(settings, now),
        AdminResponse::Done { message } => {
            state.say(Tone::Info, message);
            // Show the effect of the action at once.
            match state.screen {
                Screen::Settings => state.request(AdminRequest::Settings, effects),
                Screen::Jobs => state.request(AdminRequest::Jobs, effects),
                _ => {}
            }
        }
        AdminResponse::DeployKeyRotated { key } => {
            state.mode = Mode::ShowKey(key);
            state.say(Tone::Info, "Deploy key rotated");
            state.request(AdminRequest::Settings, effects);
        }
    }
}

fn key_press(state: &mut State, key: KeyEvent, effects: &mut Vec<Effect>) {
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    if ctrl && matches!(key.code, KeyCode::Char('c')) {
        effects.push(Effect::Quit);
        return;
    }
    match state.mode.clone() {
        Mode::Filter => filter_key(state, key),
        Mode::Edit { .. } => edit_key(state, key),
        Mode::Confirm(pending) => confirm_key(state, key, pending, effects),
        Mode::ShowKey(_) | Mode::LogDetail(_) => {
            if matches!(key.code, KeyCode::Esc | KeyCode::Enter | KeyCode::Char('q')) {
                state.mode = Mode::Normal;
            }
        }
        Mode::Normal if state.help => {
            if matches!(key.code, KeyCode::Esc | KeyCode::Char('?') | KeyCode::Char('q')) {
                state.help = false;
            }
        }
        Mode::Normal => normal_key(state, key, effects),
    }
}

fn filter_changed(state: &mut State) {
    *state.cursor_mut() = 0;
    if state.screen == Screen::Presence {
        state.recompute_presence();
    }
    state.clamp_cursors();
}

fn filter_key(state: &mut State, key: KeyEvent) {
    let i = state.screen.index();
    match key.code {
        KeyCode::Enter => state.mode = Mode::Normal,
        KeyCode::Esc => {
            state.filters[i].clear();
            state.mode = Mode::Normal;
            filter_changed(state);
        }
        KeyCode::Backspace => {
            state.filters[i].pop();
            filter_changed(state);
        }
        KeyCode::Char(c) => {
            state.filters[i].push(c);
            filter_changed(state);
        }
        _ => {}
    }
}

fn edit_key(state: &mut State, key: KeyEvent) {
    let Mode::Edit {
        key: setting,
        label,
        kind,
        mut buffer,
    } = state.mode.clone()
    else {
        return;
    };
    match key.code {
        KeyCode::Esc => {
            state.mode = Mode::Normal;
            state.say(Tone::Info, "Edit cancelled");
            return;
        }
        KeyCode::Enter => {
            match validate_setting(kind, &buffer) {
                Ok(value) => {
                    state.mode = Mode::Confirm(Pending::Setting {
                        key: setting,
                        label,
                        value,
                        secret: kind == SettingKind::Secret,
                    });
                }
                Err(why) => state.say(Tone::Error, format!("{label}: {why}")),
            }
            return;
        }
        KeyCode::Backspace => {
            buffer.pop();
        }
        KeyCode::Char(c) => buffer.push(c),
        _ => {}
    }
    state.mode = Mode::Edit {
        key: setting,
        label,
        kind,
        buffer,
    };
}

fn confirm_key(state: &mut State, key: KeyEvent, pending: Pending, effects: &mut Vec<Effect>) {
    match key.code {
        KeyCode::Char('y') | KeyCode::Char('Y') => {
            state.mode = Mode::Normal;
            let request = match pending {
                Pending::Setting { key, value, .. } => AdminRequest::UpdateSetting { key, value },
                Pending::Rotate => AdminRequest::RotateDeployKey,
                Pending::RunJob(name) => AdminRequest::RunJob { name },
                Pending::Requeue(id) => AdminRequest::RequeueDeadLetter { id },
            };
            if state.connected() {
                state.say(Tone::Info, "Sent; waiting for pulsed…");
                state.request(request, effects);
            } else {
                state.say(Tone::Error, "Not connected to pulsed; nothing was changed");
            }
        }
        KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc => {
            state.mode = Mode::Normal;
            state.say(Tone::Info, "Cancelled; nothing was changed");
        }
        _ => {}
    }
}

fn go(state: &mut State, screen: Screen, effects: &mut Vec<Effect>) {
    if state.screen != screen {
        // The change feed flows only while the data explorer is shown.
        if state.screen == Screen::Data && state.watching {
            state.watching = false;
            state.request(AdminRequest::UnwatchChanges, effects);
        }
        state.screen = screen;
        state.message = None;
        state.poll(effects);
    }
}

fn normal_key(state: &mut State, key: KeyEvent, effects: &mut Vec<Effect>) {
    let i = state.screen.index();
    let len = state.list_len(state.screen, state.focus());
    let page = 10;
    match key.code {
        KeyCode::Char('q') => effects.push(Effect::Quit),
        KeyCode::Char('?') => state.help = true,
        KeyCode::Tab => go(state, Screen::ALL[(i + 1) % 9], effects),
        KeyCode::BackTab => go(state, Screen::ALL[(i + 8) % 9], effects),
        KeyCode::Char(c @ '1'..='9') => go(state, Screen::ALL[(c as usize) - ('1' as usize)], effects),
        KeyCode::Char('/') => state.mode = Mode::Filter,
        KeyCode::Down | KeyCode::Char('j') => {
            let c = state.cursor_mut();
            *c = (*c + 1).min(len.saturating_sub(1));
        }
        KeyCode::Up | KeyCode::Char('k') => {
            let c = state.cursor_mut();
            *c = c.saturating_sub(1);
        }
        KeyCode::PageDown => {
            let c = state.cursor_mut();
            *c = (*c + page).min(len.saturating_sub(1));
        }
        KeyCode::PageUp => {
            let c = state.cursor_mut();
            *c = c.saturating_sub(page);
        }
        KeyCode::Home | KeyCode::Char('g') => *state.cursor_mut() = 0,
        KeyCode::End | KeyCode::Char('G') => *state.cursor_mut() = len.saturating_sub(1),
        KeyCode::Left | KeyCode::Char('h') => state.pane[i] = Pane::First,
        KeyCode::Right | KeyCode::Char('l') if state.screen != Screen::Logs => state.pane[i] = Pane::Second,
        KeyCode::Char('r') => {
            state.in_flight.clear();
            state.live.at_ms = 0;
            state.feed_error = None;
            state.poll(effects);
        }
        KeyCode::Esc => {
            if !state.filters[i].is_empty() {
                state.filters[i].clear();
                filter_changed(state);
            } else if state.focus() == Pane::Second {
                state.pane[i] = Pane::First;
            }
            state.message = None;
        }
        _ => screen_key(state, key, effects),
    }
}

fn screen_key(state: &mut State, key: KeyEvent, effects: &mut Vec<Effect>) {
    let cursor = state.cursor_of(state.screen, state.focus());
    match (state.screen, key.code) {
        (Screen::Logs, KeyCode::Char('l')) => {
            state.log_level = match state.log_level {
                LogLevel::Trace | LogLevel::Debug => LogLevel::Info,
                LogLevel::Info => LogLevel::Warn,
                LogLevel::Warn => LogLevel::Error,
                LogLevel::Error => LogLevel::Debug,
            };
            state.cursor[Screen::Logs.index()] = [usize::MAX, 0];
            state.clamp_cursors();
        }
        (Screen::Logs, KeyCode::Enter) if !state.log_groups => {
            if let Some(e) = state.visible_logs().get(cursor) {
                state.mode = Mode::LogDetail(e.seq);
            }
        }
        (Screen::Logs, KeyCode::Char('e')) => {
            state.log_groups = !state.log_groups;
            state.cursor[Screen::Logs.index()] = [0, 0];
        }
        (Screen::Presence, KeyCode::Enter) if state.focus() == Pane::First => {
            let tenants = state.presence_tenants();
            if let Some((tenant, _)) = tenants.get(cursor) {
                state.presence_tenant = tenant.clone();
                state.pane[Screen::Presence.index()] = Pane::Second;
                state.cursor[Screen::Presence.index()][1] = 0;
                state.recompute_presence();
                state.in_flight.remove("presence");
                state.request(
                    AdminRequest::Presence {
                        tenant: state.presence_tenant.clone(),
                    },
                    effects,
                );
            }
        }
        (Screen::Data, KeyCode::Enter) if state.focus() == Pane::First => {
            let live = |i: usize| state.live.data.as_ref().map(|l| &l[i]);
            let opened = match state.data_items().get(cursor) {
                None => return,
                Some(DataItem::Pulse(i)) => state
                    .tables
                    .data
                    .as_ref()
                    .map(|t| Opened::Pulse(t[*i].name.clone())),
                Some(DataItem::Live(i)) => live(*i).map(|t| Opened::Live {
                    table: t.name.clone(),
                    tenant: None,
                }),
                Some(DataItem::LiveTenant(i, j)) => live(*i).map(|t| Opened::Live {
                    table: t.name.clone(),
                    tenant: Some(t.tenants[*j].tenant.clone()),
                }),
            };
            if let Some(opened) = opened {
                state.open_table = Some(opened);
                state.data_offset = 0;
                state.table_rows = Remote::default();
                state.pane[Screen::Data.index()] = Pane::Second;
                state.cursor[Screen::Data.index()][1] = 0;
                rows_again(state, effects);
            }
        }
        (Screen::Data, KeyCode::Char(c @ ('[' | ']'))) => {
            if !matches!(state.open_table, Some(Opened::Live { .. })) {
                return;
            }
            let shown = state.table_rows.data.as_ref().map_or(0, |t| t.rows.len() as u32);
            let offset = if c == ']' {
                // Past the last page there is nothing to show.
                if shown < PAGE_ROWS {
                    return;
                }
                state.data_offset + PAGE_ROWS
            } else {
                state.data_offset.saturating_sub(PAGE_ROWS)
            };
            if offset != state.data_offset {
                state.data_offset = offset;
                state.cursor[Screen::Data.index()][1] = 0;
                rows_again(state, effects);
            }
        }
        (Screen::Data, KeyCode::Char('p')) => {
            state.feed_paused = !state.feed_paused;
            if !state.feed_paused {
                let held: Vec<ChangeEvent> = state.held.drain(..).collect();
                state.changes_arrived(held, 0);
            }
        }
        (Screen::Jobs, KeyCode::Enter) => {
            if !state.can_run_jobs {
                state.say(Tone::Error, "Read-only: this session may not run jobs");
                return;
            }
            let Some(jobs) = &state.jobs.data else { return };
            let pending = match state.focus() {
                Pane::First => jobs.jobs.get(cursor).map(|j| Pending::RunJob(j.name.clone())),
                Pane::Second => jobs
                    .dead_letters
                    .get(cursor)
                    .map(|d| Pending::Requeue(d.id.clone())),
            };
            if let Some(p) = pending {
                state.mode = Mode::Confirm(p);
            }
        }
        (Screen::Settings, KeyCode::Enter) if state.focus() == Pane::First => {
            if state.read_only {
                state.say(
                    Tone::Error,
                    "Read-only: this session lacks the settings capability",
                );
                return;
            }
            let Some(entry) = state.settings.data.as_ref().and_then(|s| s.get(cursor)).cloned() else {
                return;
            };
            state.mode = match entry.kind {
                SettingKind::Toggle => Mode::Confirm(Pending::Setting {
                    key: entry.key,
                    label: entry.label,
                    value: if entry.value == "true" { "false" } else { "true" }.into(),
                    secret: false,
                }),
                SettingKind::Secret => Mode::Edit {
                    key: entry.key,
                    label: entry.label,
                    kind: entry.kind,
                    buffer: String::new(),
                },
                _ => Mode::Edit {
                    key: entry.key,
                    label: entry.label,
                    kind: entry.kind,
                    buffer: entry.value,
                },
            };
        }
        (Screen::Settings, KeyCode::Char('R')) => {
            if state.read_only {
                state.say(
                    Tone::Error,
                    "Read-only: this session lacks the settings capability",
                );
            } else {
                state.mode = Mode::Confirm(Pending::Rotate);
            }
        }
        _ => {}
    }
}

/// Asks for the opened table's rows now, whatever is in flight.
fn rows_again(state: &mut State, effects: &mut Vec<Effect>) {
    state.in_flight.remove("table_rows");
    state.in_flight.remove("live_rows");
    if let Some(request) = state.rows_request() {
        state.request(request, effects);
    }
}

#[cfg(test)]
mod tests {
    use pulse_shared::admin::{PresenceEntry, TenantPresence};

    use super::*;

    fn key(code: KeyCode) -> Action {
        Action::Key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    fn connected() -> State {
        let mut s = State::new("unix:/tmp/x".into(), false);
        update(
            &mut s,
            Action::Net(NetEvent::Connected {
                server_version: "0.1.0".into(),
                roles: vec!["service".into()],
            }),
        );
        s
    }

    fn requests(effects: &[Effect]) -> Vec<AdminRequest> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Request { request, .. } => Some(request.clone()),
                Effect::Quit => None,
            })
            .collect()
    }

    fn answer_all(s: &mut State, effects: &[Effect], f: impl Fn(&AdminRequest) -> Option<AdminResponse>) {
        for e in effects {
            if let Effect::Request { id, request } = e
                && let Some(response) = f(request)
            {
                update(
                    s,
                    Action::Net(NetEvent::Response {
                        id: id.clone(),
                        response,
                    }),
                );
            }
        }
    }

    #[test]
    fn q_and_ctrl_c_quit() {
        let mut s = connected();
        assert_eq!(update(&mut s, key(KeyCode::Char('q'))), vec![Effect::Quit]);
        let ctrl_c = Action::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
        // Even while typing a filter.
        update(&mut s, key(KeyCode::Char('/')));
        assert_eq!(update(&mut s, ctrl_c), vec![Effect::Quit]);
    }

    #[test]
    fn tabs_and_numbers_switch_screens_and_poll_them() {
        let mut s = connected();
        let effects = update(&mut s, key(KeyCode::Tab));
        assert_eq!(s.screen, Screen::Presence);
        assert!(requests(&effects).contains(&AdminRequest::Presence { tenant: None }));
        update(&mut s, key(KeyCode::BackTab));
        update(&mut s, key(KeyCode::BackTab));
        assert_eq!(s.screen, Screen::Settings);
        update(&mut s, key(KeyCode::Char('4')));
        assert_eq!(s.screen, Screen::Logs);
    }

    #[test]
    fn a_slow_daemon_is_not_asked_twice() {
        let mut s = connected();
        let first = update(&mut s, Action::Tick { now_ms: 1000 });
        assert!(requests(&first).is_empty(), "all still in flight: {first:?}");
        // Answer the status request; the next tick asks for it again, and only it.
        let status_id = "status#1".to_string();
        update(
            &mut s,
            Action::Net(NetEvent::Response {
                id: status_id,
                response: AdminResponse::Status(StatusReport {
                    version: "x".into(),
                    uptime_secs: 1,
                    components: vec![],
                }),
            }),
        );
        let next = update(&mut s, Action::Tick { now_ms: 2000 });
        assert_eq!(requests(&next), vec![AdminRequest::Status]);
    }

    #[test]
    fn a_lost_answer_does_not_block_polling_for_ever() {
        let mut s = connected();
        s.now_ms = 1_000;
        assert!(requests(&update(&mut s, Action::Tick { now_ms: 5_000 })).is_empty());
        let later = update(&mut s, Action::Tick { now_ms: 10_000 });
        assert!(requests(&later).contains(&AdminRequest::Status), "{later:?}");
    }

    #[test]
    fn nothing_is_sent_while_disconnected_and_reconnect_polls_again() {
        let mut s = connected();
        update(
            &mut s,
            Action::Net(NetEvent::Disconnected {
                reason: "refused".into(),
                retry_in_secs: 2,
            }),
        );
        assert!(update(&mut s, Action::Tick { now_ms: 5 }).is_empty());
        let effects = update(
            &mut s,
            Action::Net(NetEvent::Connected {
                server_version: "0.1.0".into(),
                roles: vec!["service".into()],
            }),
        );
        assert!(requests(&effects).contains(&AdminRequest::Status));
    }

    fn presence(n: usize) -> PresenceReport {
        PresenceReport {
            tenants: vec![
                TenantPresence {
                    tenant: "acme".into(),
                    online: n.div_ceil(2) as u64,
                },
                TenantPresence {
                    tenant: "zeta".into(),
                    online: (n / 2) as u64,
                },
            ],
            users: (0..n)
                .map(|i| PresenceEntry {
                    tenant: if i % 2 == 0 { "acme" } else { "zeta" }.into(),
                    user: format!("user{i}"),
                    resource: format!("/events/{}", i % 7),
                    state: "active".into(),
                    last_seen_secs: Some((i % 30) as u64),
                })
                .collect(),
        }
    }

    #[test]
    fn presence_filters_by_tenant_and_text() {
        let mut s = connected();
        let effects = update(&mut s, key(KeyCode::Char('2')));
        answer_all(&mut s, &effects, |r| {
            matches!(r, AdminRequest::Presence { .. }).then(|| AdminResponse::Presence(presence(10)))
        });
        assert_eq!(s.presence_rows.len(), 10);
        // Choose tenant "zeta" (row 2: all, acme, zeta).
        update(&mut s, key(KeyCode::Char('j')));
        update(&mut s, key(KeyCode::Char('j')));
        let effects = update(&mut s, key(KeyCode::Enter));
        assert_eq!(
            requests(&effects),
            vec![AdminRequest::Presence {
                tenant: Some("zeta".into())
            }]
        );
        assert_eq!(s.presence_rows.len(), 5);
        assert_eq!(s.focus(), Pane::Second);
        for c in "user3".chars() {
            update(&mut s, key(KeyCode::Char('/')));
            update(&mut s, key(KeyCode::Char(c)));
            update(&mut s, key(KeyCode::Enter));
        }
        assert_eq!(s.filter(), "user3");
        assert_eq!(s.presence_rows.len(), 1);
        update(&mut s, key(KeyCode::Esc));
        assert_eq!(s.filter(), "");
        assert_eq!(s.presence_rows.len(), 5);
    }

    #[test]
    fn unavailable_subsystems_are_recorded_not_invented() {
        let mut s = connected();
        let effects = update(&mut s, key(KeyCode::Char('6')));
        let id = effects
            .iter()
            .find_map(|e| match e {
                Effect::Request {
                    id,
                    request: AdminRequest::Storage,
                } => Some(id.clone()),
                _ => None,
            })
            .unwrap();
        update(
            &mut s,
            Action::Net(NetEvent::Error {
                id: Some(id),
                error: ErrorBody::new(
                    ErrorCode::Unavailable,
                    "storage: file storage is not part of this build",
                ),
            }),
        );
        assert!(s.storage.data.is_none());
        assert!(s.storage.unavailable().unwrap().message.contains("file storage"));
    }

    fn with_settings() -> State {
        let mut s = connected();
        let effects = update(&mut s, key(KeyCode::Char('9')));
        answer_all(&mut s, &effects, |r| {
            matches!(r, AdminRequest::Settings).then(|| AdminResponse::Settings {
                settings: vec![
                    SettingEntry {
                        key: "deployment_url".into(),
                        label: "Deployment URL".into(),
                        kind: SettingKind::Url,
                        value: "http://localhost:8080".into(),
                        source: "config".into(),
                    },
                    SettingEntry {
                        key: "deploy_key".into(),
                        label: "Deploy Key".into(),
                        kind: SettingKind::Secret,
                        value: "***".into(),
                        source: "config".into(),
                    },
                    SettingEntry {
                        key: "enable_realtime".into(),
                        label: "Enable Real-time".into(),
                        kind: SettingKind::Toggle,
                        value: "true".into(),
                        source: "config".into(),
                    },
                    SettingEntry {
                        key: "sync_interval_ms".into(),
                        label: "Sync Interval".into(),
                        kind: SettingKind::Millis,
                        value: "5000".into(),
                        source: "config".into(),
                    },
                ],
            })
        });
        s
    }

    #[test]
    fn a_setting_edit_is_validated_then_confirmed_then_sent() {
        let mut s = with_settings();
        for _ in 0..3 {
            update(&mut s, key(KeyCode::Down));
        }
        update(&mut s, key(KeyCode::Enter));
        assert!(matches!(&s.mode, Mode::Edit { buffer, .. } if buffer == "5000"));
        for _ in 0..4 {
            update(&mut s, key(KeyCode::Backspace));
        }
        // Too small: refused before any confirmation.
        update(&mut s, key(KeyCode::Char('5')));
        update(&mut s, key(KeyCode::Enter));
        assert!(matches!(s.mode, Mode::Edit { .. }));
        assert!(matches!(&s.message, Some((Tone::Error, m)) if m.contains("100 to 3600000")));
        for c in "00".chars() {
            update(&mut s, key(KeyCode::Char(c)));
        }
        assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
        assert!(matches!(&s.mode, Mode::Confirm(Pending::Setting { value, .. }) if value == "500"));
        let effects = update(&mut s, key(KeyCode::Char('y')));
        assert_eq!(
            requests(&effects),
            vec![AdminRequest::UpdateSetting {
                key: "sync_interval_ms".into(),
                value: "500".into()
            }]
        );
        assert_eq!(s.mode, Mode::Normal);
    }

    #[test]
    fn a_refused_edit_is_reported_in_the_status_bar() {
        let mut s = with_settings();
        update(&mut s, key(KeyCode::Enter));
        update(&mut s, key(KeyCode::Enter));
        let effects = update(&mut s, key(KeyCode::Char('y')));
        let Some(Effect::Request { id, .. }) = effects.first() else {
            panic!("{effects:?}")
        };
        update(
            &mut s,
            Action::Net(NetEvent::Error {
                id: Some(id.clone()),
                error: ErrorBody::new(ErrorCode::Forbidden, "changing platform settings: not allowed"),
            }),
        );
        assert!(matches!(&s.message, Some((Tone::Error, m)) if m.starts_with("forbidden: changing")));
        // The settings themselves are still shown, not replaced by the error.
        assert!(s.settings.error.is_none() && s.settings.data.is_some());
    }

    #[test]
    fn a_declined_confirmation_sends_nothing() {
        let mut s = with_settings();
        update(&mut s, key(KeyCode::Char('R')));
        assert_eq!(s.mode, Mode::Confirm(Pending::Rotate));
        assert!(update(&mut s, key(KeyCode::Char('n'))).is_empty());
        assert_eq!(s.mode, Mode::Normal);
        // The toggle asks for confirmation of the flipped value.
        update(&mut s, key(KeyCode::Char('j')));
        update(&mut s, key(KeyCode::Char('j')));
        update(&mut s, key(KeyCode::Enter));
        assert!(matches!(&s.mode, Mode::Confirm(Pending::Setting { value, .. }) if value == "false"));
        assert!(update(&mut s, key(KeyCode::Esc)).is_empty());
    }

    #[test]
    fn the_rotated_key_is_shown_once() {
        let mut s = with_settings();
        update(&mut s, key(KeyCode::Char('R')));
        let effects = update(&mut s, key(KeyCode::Char('y')));
        let Some(Effect::Request { id, request }) = effects.first() else {
            panic!("{effects:?}")
        };
        assert_eq!(*request, AdminRequest::RotateDeployKey);
        update(
            &mut s,
            Action::Net(NetEvent::Response {
                id: id.clone(),
                response: AdminResponse::DeployKeyRotated { key: "k".repeat(64) },
            }),
        );
        assert_eq!(s.mode, Mode::ShowKey("k".repeat(64)));
        update(&mut s, key(KeyCode::Esc));
        assert_eq!(s.mode, Mode::Normal);
        assert!(!format!("{s:?}").contains(&"k".repeat(64)));
    }

    #[test]
    fn read_only_sessions_cannot_start_edits() {
        let mut s = with_settings();
        s.read_only = true;
        update(&mut s, key(KeyCode::Enter));
        assert_eq!(s.mode, Mode::Normal);
        assert!(matches!(&s.message, Some((Tone::Error, m)) if m.contains("Read-only")));
        update(&mut s, key(KeyCode::Char('R')));
        assert_eq!(s.mode, Mode::Normal);
    }

    #[test]
    fn roles_decide_read_only() {
        let mut s = State::new("x".into(), false);
        update(
            &mut s,
            Action::Net(NetEvent::Connected {
                server_version: "0".into(),
                roles: vec!["staff".into()],
            }),
        );
        assert!(s.read_only && !s.can_run_jobs);
        let s = connected();
        assert!(!s.read_only && s.can_run_jobs);
    }

    #[test]
    fn logs_accumulate_and_filter_by_level_and_text() {
        let mut s = connected();
        let entry = |seq, level, message: &str| LogEntry {
            seq,
            at_ms: 0,
            level,
            target: "pulse_daemon".into(),
            message: message.into(),
            fields: vec![("slot".into(), "s1".into())],
        };
        let page = |entries| {
            AdminResponse::Logs(pulse_shared::admin::LogsPage {
                entries,
                errors: vec![],
                dropped: 0,
            })
        };
        update(
            &mut s,
            Action::Net(NetEvent::Response {
                id: "logs#1".into(),
                response: page(vec![
                    entry(1, LogLevel::Info, "ready"),
                    entry(2, LogLevel::Error, "broker down"),
                ]),
            }),
        );
        update(
            &mut s,
            Action::Net(NetEvent::Response {
                id: "logs#2".into(),
                response: page(vec![entry(3, LogLevel::Warn, "slow")]),
            }),
        );
        assert_eq!(s.log_seq, 3);
        assert_eq!(s.visible_logs().len(), 3);
        // Opening the screen asks only for newer events.
        let effects = update(&mut s, key(KeyCode::Char('4')));
        assert!(
            requests(&effects).contains(&AdminRequest::Logs {
                after: 3,
                limit: 1000
            }),
            "{effects:?}"
        );
        update(&mut s, key(KeyCode::Char('l')));
        assert_eq!(s.visible_logs().len(), 2);
        update(&mut s, key(KeyCode::Char('l')));
        assert_eq!(s.visible_logs().len(), 1);
        update(&mut s, key(KeyCode::Char('l')));
        update(&mut s, key(KeyCode::Char('/')));
        for c in "SLOW".chars() {
            update(&mut s, key(KeyCode::Char(c)));
        }
        assert_eq!(s.visible_logs().len(), 1);
        // After a reconnect (pulsed may have restarted) the whole buffer is read again.
        let mut again = s.clone();
        let effects = update(
            &mut again,
            Action::Net(NetEvent::Connected {
                server_version: "0.1.0".into(),
                roles: vec!["service".into()],
            }),
        );
        assert!(requests(&effects).contains(&AdminRequest::Logs {
            after: 0,
            limit: 1000
        }));
        assert!(again.logs.is_empty());
        // Enter shows the event in full; Esc closes it.
        update(&mut s, key(KeyCode::Enter));
        update(&mut s, key(KeyCode::Enter));
        assert_eq!(s.mode, Mode::LogDetail(3));
        update(&mut s, key(KeyCode::Esc));
        assert_eq!(s.mode, Mode::Normal);
    }

    #[test]
    fn the_cursor_stays_in_bounds() {
        let mut s = connected();
        let effects = update(&mut s, key(KeyCode::Char('2')));
        answer_all(&mut s, &effects, |r| {
            matches!(r, AdminRequest::Presence { .. }).then(|| AdminResponse::Presence(presence(3)))
        });
        update(&mut s, key(KeyCode::Char('l')));
        update(&mut s, key(KeyCode::Char('G')));
        assert_eq!(s.cursor_of(Screen::Presence, Pane::Second), 2);
        for _ in 0..5 {
            update(&mut s, key(KeyCode::Down));
        }
        assert_eq!(s.cursor_of(Screen::Presence, Pane::Second), 2);
        // Fewer rows arrive: the cursor follows.
        update(
            &mut s,
            Action::Net(NetEvent::Response {
                id: "presence#99".into(),
                response: AdminResponse::Presence(presence(1)),
            }),
        );
        assert_eq!(s.cursor_of(Screen::Presence, Pane::Second), 0);
    }

    #[test]
    fn replication_throughput_comes_from_confirmed_positions() {
        let mut s = connected();
        let report = |lsn: &str| {
            AdminResponse::Replication(ReplicationReport {
                current_lsn: "0/3000000".into(),
                slots: vec![pulse_shared::admin::SlotInfo {
                    name: "pulse".into(),
                    plugin: "pgoutput".into(),
                    database: "app".into(),
                    active: true,
                    restart_lsn: Some("0/1000000".into()),
                    confirmed_flush_lsn: Some(lsn.into()),
                    lag_bytes: Some(4096),
                    retained_bytes: Some(8192),
                    wal_status: Some("reserved".into()),
                }],
                senders: vec![],
            })
        };
        s.now_ms = 1_000;
        update(
            &mut s,
            Action::Net(NetEvent::Response {
                id: "replication#1".into(),
                response: report("0/1000000"),
            }),
        );
        s.now_ms = 3_000;
        update(
            &mut s,
            Action::Net(NetEvent::Response {
                id: "replication#2".into(),
                response: report("0/1000800"),
            }),
        );
        assert_eq!(s.slot_rates, vec![("pulse".to_string(), 1024)]);
        assert_eq!(s.history.replication_lag.back(), Some(&4096));
        assert_eq!(lsn_bytes("1/0"), Some(1 << 32));
    }

    #[test]
    fn help_opens_and_closes() {
        let mut s = connected();
        update(&mut s, key(KeyCode::Char('?')));
        assert!(s.help);
        // Keys do not leak to the screen behind it.
        update(&mut s, key(KeyCode::Char('3')));
        assert_eq!(s.screen, Screen::Overview);
        update(&mut s, key(KeyCode::Esc));
        assert!(!s.help);
    }

    fn change(seq: u64, key: &str) -> ChangeEvent {
        ChangeEvent {
            seq,
            lsn: format!("0/{seq:X}"),
            commit_time: "2026-11-24T10:00:00.000Z".into(),
            xid: seq as u32,
            table: "public.members".into(),
            op: "insert".into(),
            key: key.into(),
            columns: vec![("tenant_id".into(), "acme".into())],
        }
    }

    fn pushed(s: &mut State, id: &str, changes: Vec<ChangeEvent>, missed: u64) {
        update(
            s,
            Action::Net(NetEvent::Response {
                id: id.into(),
                response: AdminResponse::Changes { changes, missed },
            }),
        );
    }

    #[test]
    fn the_change_feed_flows_while_the_data_explorer_is_shown_and_pauses() {
        let mut s = connected();
        assert!(
            !requests(&update(&mut s, Action::Tick { now_ms: 1000 }))
                .iter()
                .any(|r| matches!(r, AdminRequest::WatchChanges { .. }))
        );
        // Opening the screen starts the feed once, from the start.
        let effects = update(&mut s, key(KeyCode::Char('5')));
        let watch = effects
            .iter()
            .find_map(|e| match e {
                Effect::Request {
                    id,
                    request: AdminRequest::WatchChanges { after },
                } => Some((id.clone(), *after)),
                _ => None,
            })
            .expect("a watch request");
        assert_eq!(watch.1, 0);
        let again = update(&mut s, Action::Tick { now_ms: 2000 });
        assert!(
            !requests(&again)
                .iter()
                .any(|r| matches!(r, AdminRequest::WatchChanges { .. }))
        );
        pushed(&mut s, &watch.0, vec![change(1, "id=1"), change(2, "id=2")], 0);
        pushed(&mut s, &watch.0, vec![change(3, "id=3")], 0);
        assert_eq!(s.changes.len(), 3);
        assert_eq!(s.feed_seq, 3);
        // Paused: new changes are held, the shown list stays still; resuming shows them.
        update(&mut s, key(KeyCode::Char('p')));
        pushed(&mut s, &watch.0, vec![change(4, "id=4")], 2);
        assert_eq!((s.changes.len(), s.held.len(), s.feed_missed), (3, 1, 2));
        update(&mut s, key(KeyCode::Char('p')));
        assert_eq!((s.changes.len(), s.held.len()), (4, 0));
        // The filter narrows the feed.
        update(&mut s, key(KeyCode::Char('/')));
        for c in "id=4".chars() {
            update(&mut s, key(KeyCode::Char(c)));
        }
        assert_eq!(s.visible_changes().len(), 1);
        update(&mut s, key(KeyCode::Esc));
        // Leaving the screen stops the feed; coming back resumes after the last seen.
        let effects = update(&mut s, key(KeyCode::Char('1')));
        assert!(requests(&effects).contains(&AdminRequest::UnwatchChanges));
        let effects = update(&mut s, key(KeyCode::Char('5')));
        assert!(requests(&effects).contains(&AdminRequest::WatchChanges { after: 4 }));
        // A reconnect opens a new session: the feed is asked for again.
        update(
            &mut s,
            Action::Net(NetEvent::Disconnected {
                reason: "gone".into(),
                retry_in_secs: 1,
            }),
        );
        assert!(!s.watching);
        let effects = update(
            &mut s,
            Action::Net(NetEvent::Connected {
                server_version: "0.1.0".into(),
                roles: vec!["service".into()],
            }),
        );
        assert!(requests(&effects).contains(&AdminRequest::WatchChanges { after: 4 }));
    }

    #[test]
    fn the_feed_is_bounded_and_a_refused_watch_is_not_retried_every_second() {
        let mut s = connected();
        update(&mut s, key(KeyCode::Char('5')));
        pushed(
            &mut s,
            "watch_changes#1",
            (1..=(FEED_KEEP as u64 + 20)).map(|i| change(i, "k")).collect(),
            0,
        );
        assert_eq!(s.changes.len(), FEED_KEEP);
        assert_eq!(s.changes.front().unwrap().seq, 21);
        update(
            &mut s,
            Action::Net(NetEvent::Error {
                id: Some("watch_changes#9".into()),
                error: ErrorBody::new(ErrorCode::Forbidden, "the data explorer: no"),
            }),
        );
        assert!(s.feed_error.is_some());
        let effects = update(&mut s, Action::Tick { now_ms: 5000 });
        assert!(
            !requests(&effects)
                .iter()
                .any(|r| matches!(r, AdminRequest::WatchChanges { .. }))
        );
        // r tries again.
        let effects = update(&mut s, key(KeyCode::Char('r')));
        assert!(
            requests(&effects)
                .iter()
                .any(|r| matches!(r, AdminRequest::WatchChanges { .. }))
        );
    }

    #[test]
    fn live_tables_open_by_tenant_and_page() {
        use pulse_shared::admin::TenantRows;
        let mut s = connected();
        update(&mut s, key(KeyCode::Char('5')));
        update(
            &mut s,
            Action::Net(NetEvent::Response {
                id: "live_tables#1".into(),
                response: AdminResponse::LiveTables {
                    tables: vec![LiveTableInfo {
                        name: "members".into(),
                        source: "public.members".into(),
                        tenant_column: "tenant_id".into(),
                        rows: 3,
                        estimated: false,
                        tenants: vec![
                            TenantRows {
                                tenant: "t1".into(),
                                rows: 2,
                            },
                            TenantRows {
                                tenant: "t2".into(),
                                rows: 1,
                            },
                        ],
                    }],
                },
            }),
        );
        assert_eq!(
            s.data_items(),
            vec![
                DataItem::Live(0),
                DataItem::LiveTenant(0, 0),
                DataItem::LiveTenant(0, 1)
            ]
        );
        // The filter keeps matching tenants under their table.
        update(&mut s, key(KeyCode::Char('/')));
        update(&mut s, key(KeyCode::Char('2')));
        update(&mut s, key(KeyCode::Enter));
        assert_eq!(
            s.data_items(),
            vec![DataItem::Live(0), DataItem::LiveTenant(0, 1)]
        );
        update(&mut s, key(KeyCode::Char('j')));
        let effects = update(&mut s, key(KeyCode::Enter));
        assert!(
            requests(&effects).contains(&AdminRequest::LiveRows {
                table: "members".into(),
                tenant: Some("t2".into()),
                offset: 0,
                limit: PAGE_ROWS,
            }),
            "{effects:?}"
        );
        // A short page is the last: ] does nothing; a full one pages on, [ back.
        let page = |n: usize, offset: u32| {
            Action::Net(NetEvent::Response {
                id: "live_rows#5".into(),
                response: AdminResponse::TableRows(TableRows {
                    table: "members".into(),
                    columns: vec!["id".into()],
                    rows: vec![vec!["1".into()]; n],
                    offset,
                }),
            })
        };
        update(&mut s, page(1, 0));
        assert!(update(&mut s, key(KeyCode::Char(']'))).is_empty());
        update(&mut s, page(PAGE_ROWS as usize, 0));
        let effects = update(&mut s, key(KeyCode::Char(']')));
        assert!(requests(&effects).contains(&AdminRequest::LiveRows {
            table: "members".into(),
            tenant: Some("t2".into()),
            offset: PAGE_ROWS,
            limit: PAGE_ROWS,
        }));
        let effects = update(&mut s, key(KeyCode::Char('[')));
        assert!(
            requests(&effects)
                .iter()
                .any(|r| matches!(r, AdminRequest::LiveRows { offset: 0, .. }))
        );
    }

    #[test]
    fn function_errors_are_a_rate_over_the_last_minute() {
        let mut s = connected();
        let sample = |s: &mut State, at: i64, runs: u64, failed: u64| {
            s.now_ms = at;
            update(
                s,
                Action::Net(NetEvent::Response {
                    id: "metrics#1".into(),
                    response: AdminResponse::Metrics(MetricsSample {
                        functions_total: Some(runs),
                        function_errors_total: Some(failed),
                        ..Default::default()
                    }),
                }),
            );
        };
        assert_eq!(s.function_error_pct(), None);
        // Old failures long ago do not count; of 200 runs in the last minute, 3 failed.
        sample(&mut s, 0, 1000, 500);
        sample(&mut s, 30_000, 1000, 500);
        sample(&mut s, 100_000, 1200, 503);
        assert_eq!(s.function_error_pct(), Some(0.0), "only one sample in the window");
        sample(&mut s, 120_000, 1400, 506);
        let pct = s.function_error_pct().unwrap();
        assert!((pct - 1.5).abs() < 1e-9, "{pct}");
        // A restarted pulsed counts from zero: the window starts over.
        sample(&mut s, 121_000, 5, 0);
        assert_eq!(s.function_error_pct(), Some(0.0));
        // Nothing ran: 0 %, not "unknown".
        sample(&mut s, 122_000, 5, 0);
        assert_eq!(s.function_error_pct(), Some(0.0));
    }
}
