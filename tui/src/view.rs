//! Drawing: [`render`] turns a [`State`] into a frame and changes nothing.
//!
//! Every screen draws only the rows that fit (the presence screen with 10,000 users
//! builds about 40 rows a frame). Colours come from one [`Theme`], plain when NO_COLOR
//! is set; the selection stays visible without colour (reversed video).

use std::collections::VecDeque;
use std::ops::Range;

use pulse_shared::ErrorBody;
use pulse_shared::admin::{HealthState, LogLevel, SettingKind};
use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Block, Cell, Clear, Paragraph, Row, Sparkline, Table, Wrap};

use crate::state::{Conn, DataItem, Mode, Opened, Pane, Pending, Remote, Screen, State, Tone};

/// Styles, with or without colour.
#[derive(Debug, Clone, Copy)]
pub struct Theme {
    color: bool,
}

impl Theme {
    fn fg(self, c: Color) -> Style {
        if self.color {
            Style::new().fg(c)
        } else {
            Style::new()
        }
    }
    fn ok(self) -> Style {
        self.fg(Color::Green)
    }
    fn warn(self) -> Style {
        self.fg(Color::Yellow)
    }
    fn bad(self) -> Style {
        self.fg(Color::Red).add_modifier(Modifier::BOLD)
    }
    fn dim(self) -> Style {
        self.fg(Color::DarkGray)
    }
    fn accent(self) -> Style {
        self.fg(Color::Cyan)
    }
    fn header(self) -> Style {
        Style::new().add_modifier(Modifier::BOLD)
    }
    fn selected(self) -> Style {
        Style::new().add_modifier(Modifier::REVERSED)
    }
}

/// Draws the whole console.
pub fn render(state: &State, frame: &mut Frame<'_>) {
    let theme = Theme { color: state.color };
    let [tabs, body, status] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(3), Constraint::Length(1)])
            .areas(frame.area());
    render_tabs(state, theme, frame, tabs);
    match state.screen {
        Screen::Overview => overview(state, theme, frame, body),
        Screen::Presence => presence(state, theme, frame, body),
        Screen::Notifications => notifications(state, theme, frame, body),
        Screen::Logs => logs(state, theme, frame, body),
        Screen::Data => data(state, theme, frame, body),
        Screen::Storage => storage(state, theme, frame, body),
        Screen::Jobs => jobs(state, theme, frame, body),
        Screen::Replication => replication(state, theme, frame, body),
        Screen::Settings => settings(state, theme, frame, body),
    }
    render_status(state, theme, frame, status);
    match &state.mode {
        Mode::Confirm(p) => confirm_dialog(p, theme, frame),
        Mode::Edit {
            label, kind, buffer, ..
        } => edit_dialog(label, *kind, buffer, theme, frame),
        Mode::ShowKey(key) => key_dialog(key, theme, frame),
        Mode::LogDetail(seq) => {
            if let Some(e) = state.logs.iter().find(|e| e.seq == *seq) {
                let mut lines = vec![
                    Line::from(vec![
                        Span::styled(format!("{} ", clock(e.at_ms)), theme.dim()),
                        Span::styled(e.level.as_str(), level_style(theme, e.level)),
                        Span::raw(format!(" {}", e.target)),
                    ]),
                    Line::raw(e.message.clone()),
                ];
                lines.extend(e.fields.iter().map(|(k, v)| {
                    Line::from(vec![
                        Span::styled(format!("{k} = "), theme.accent()),
                        Span::raw(v.clone()),
                    ])
                }));
                lines.push(Line::styled("Esc closes", theme.dim()));
                dialog(frame, "Log event", lines, theme);
            }
        }
        Mode::Normal | Mode::Filter => {}
    }
    if state.help {
        help(theme, frame);
    }
}

fn render_tabs(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    let short = |s: Screen| match s {
        Screen::Notifications => "Notif",
        Screen::Replication => "Repl",
        other => other.title(),
    };
    let full: usize = Screen::ALL.iter().map(|s| s.title().len() + 4).sum();
    let spans: Vec<Span<'_>> = Screen::ALL
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let text = if full <= area.width as usize {
                format!(" {} {} ", i + 1, s.title())
            } else {
                format!("{} {} ", i + 1, short(*s))
            };
            if *s == state.screen {
                Span::styled(text, theme.selected().add_modifier(Modifier::BOLD))
            } else {
                Span::styled(text, theme.dim())
            }
        })
        .collect();
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn render_status(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    let mut spans = Vec::new();
    // With a message or a filter to show, the connection is told in one word.
    let brief = state.mode == Mode::Filter || state.message.is_some();
    match &state.conn {
        Conn::Connected { server_version, .. } => {
            spans.push(Span::styled("● connected", theme.ok()));
            if !brief {
                spans.push(Span::raw(format!(
                    " {} · pulsed {server_version}",
                    state.endpoint
                )));
            }
        }
        Conn::Connecting { attempt } => {
            spans.push(Span::styled("◌ connecting", theme.warn()));
            if !brief {
                spans.push(Span::raw(format!(" {} (attempt {attempt})", state.endpoint)));
            }
        }
        Conn::Disconnected {
            reason,
            retry_in_secs,
        } => {
            // The retry first: a long reason is cut at the edge, the countdown is not.
            spans.push(Span::styled("○ disconnected", theme.bad()));
            spans.push(Span::raw(format!(" (retry in {retry_in_secs}s): {reason}")));
        }
    }
    if state.connected() && state.read_only {
        spans.push(Span::styled(" · read-only", theme.warn()));
    }
    spans.push(Span::raw(" │ "));
    if state.mode == Mode::Filter {
        spans.push(Span::styled(format!("/{}█", state.filter()), theme.accent()));
        spans.push(Span::styled("  Enter keep · Esc clear", theme.dim()));
    } else if let Some((tone, text)) = &state.message {
        let style = match tone {
            Tone::Info => theme.accent(),
            Tone::Error => theme.bad(),
        };
        spans.push(Span::styled(text.clone(), style));
    } else if !state.filter().is_empty() {
        spans.push(Span::styled(
            format!("filter: {}", state.filter()),
            theme.accent(),
        ));
    } else {
        spans.push(Span::styled("? help · q quit", theme.dim()));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// The rows of a list of `len` that fit in `height` with `cursor` visible.
fn window(len: usize, cursor: usize, height: usize) -> Range<usize> {
    if height == 0 || len == 0 {
        return 0..0;
    }
    let start = cursor.saturating_sub(height - 1).min(len.saturating_sub(height));
    start..(start + height).min(len)
}

fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A measured figure: percentages with one decimal (1.4% is not 1%), the rest whole.
fn figure(v: f64, unit: &str) -> String {
    if unit == "%" {
        format!("{v:.1}%")
    } else if unit.is_empty() {
        format!("{v:.0}")
    } else {
        format!("{v:.0} {unit}")
    }
}

fn clock(ms: i64) -> String {
    let s = (ms / 1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {:02}m", s / 3600, (s / 60) % 60),
        s => format!("{}d {:02}h", s / 86_400, (s / 3600) % 24),
    }
}

fn titled<'a>(title: impl Into<Line<'a>>, focused: bool, theme: Theme) -> Block<'a> {
    let block = Block::bordered().title(title);
    if focused {
        block.border_style(theme.accent())
    } else {
        block
    }
}

/// Draws why there is no data: not available in this pulsed, an error, or waiting.
fn placeholder(
    state: &State,
    theme: Theme,
    frame: &mut Frame<'_>,
    area: Rect,
    title: &str,
    error: Option<&ErrorBody>,
) {
    let text = match error {
        Some(e) if e.code == pulse_shared::ErrorCode::Unavailable => Text::from(vec![
            Line::styled("Not available", theme.warn().add_modifier(Modifier::BOLD)),
            Line::raw(""),
            Line::raw(e.message.clone()),
            Line::raw(""),
            Line::styled(
                "This screen shows live data once pulsed provides it; nothing here is simulated.",
                theme.dim(),
            ),
        ]),
        Some(e) => Text::from(vec![
            Line::styled(format!("Error: {}", e.code), theme.bad()),
            Line::raw(e.message.clone()),
        ]),
        None if state.connected() => Text::from(Line::styled("Waiting for pulsed…", theme.dim())),
        None => Text::from(Line::styled("Not connected; see the status bar.", theme.dim())),
    };
    frame.render_widget(
        Paragraph::new(text)
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(title.to_string())),
        area,
    );
}

/// The data of a remote, or draws its placeholder and gives `None`.
fn ready<'a, T>(
    remote: &'a Remote<T>,
    state: &State,
    theme: Theme,
    frame: &mut Frame<'_>,
    area: Rect,
    title: &str,
) -> Option<&'a T> {
    match &remote.data {
        Some(d) => Some(d),
        None => {
            placeholder(state, theme, frame, area, title, remote.error.as_ref());
            None
        }
    }
}

/// A title with a stale-data warning when the latest request failed.
fn title_of<T>(base: String, remote: &Remote<T>, theme: Theme) -> Line<'static> {
    let mut spans = vec![Span::raw(base)];
    if let Some(e) = &remote.error {
        spans.push(Span::styled(format!(" stale: {} ", e.code), theme.bad()));
    }
    Line::from(spans)
}

/// A row, reversed when it holds the cursor (visible without colour).
fn pick<T: ratatui::style::Styled<Item = T>>(item: T, selected: bool, theme: Theme) -> T {
    if selected {
        item.set_style(theme.selected())
    } else {
        item
    }
}

/// A table with its header row, in a block.
fn draw_table<'a>(
    frame: &mut Frame<'_>,
    area: Rect,
    rows: impl IntoIterator<Item = Row<'a>>,
    widths: &[Constraint],
    header: &[&'a str],
    block: Block<'a>,
    theme: Theme,
) {
    frame.render_widget(
        Table::new(rows, widths.to_vec())
            .header(Row::new(header.to_vec()).style(theme.header()))
            .block(block),
        area,
    );
}

fn health_style(theme: Theme, h: HealthState) -> (Style, &'static str) {
    match h {
        HealthState::Up => (theme.ok(), "up"),
        HealthState::Degraded => (theme.warn(), "degraded"),
        HealthState::Down => (theme.bad(), "down"),
    }
}

fn overview(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    let components = state
        .status
        .data
        .as_ref()
        .map_or(1, |s| s.components.len().max(1)) as u16;
    let [info, health, alerts, sparks] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(components + 3),
        Constraint::Length(7),
        Constraint::Min(3),
    ])
    .areas(area);
    let metrics = state.metrics.data.as_ref();
    let info_line = match &state.status.data {
        Some(s) => Line::from(vec![
            Span::styled(format!(" pulsed {}", s.version), theme.header()),
            Span::raw(format!(
                " · up {} · {} connections · {} errors since start",
                duration(s.uptime_secs),
                metrics.map_or(0, |m| m.connections),
                metrics.map_or(0, |m| m.errors_total)
            )),
        ]),
        None => Line::raw(""),
    };
    frame.render_widget(Paragraph::new(info_line), info);

    if let Some(status) = ready(&state.status, state, theme, frame, health, "Health") {
        let cursor = state.cursor_of(Screen::Overview, Pane::First);
        let rows = status.components.iter().enumerate().map(|(i, c)| {
            let (style, word) = health_style(theme, c.state);
            let row = Row::new(vec![
                Cell::from(c.name.clone()),
                Cell::from(Span::styled(word, style)),
                Cell::from(c.detail.clone()),
            ]);
            pick(row, i == cursor, theme)
        });
        let table = Table::new(
            rows,
            [Constraint::Length(16), Constraint::Length(9), Constraint::Min(10)],
        )
        .header(Row::new(["Component", "State", "Detail"]).style(theme.header()))
        .block(titled(
            title_of("Health".into(), &state.status, theme),
            false,
            theme,
        ));
        frame.render_widget(table, health);
    }

    // Alerts against the product page's thresholds; unmeasured figures say so.
    let lines: Vec<Line<'_>> = {
        let m = metrics.cloned().unwrap_or_default();
        let not_measured = "not measured by this pulsed";
        // (name, value, threshold, unit, why there is no value)
        let checks: [(&str, Option<f64>, f64, &str, &str); 5] = [
            ("query latency p50", m.query_p50_ms, 200.0, "ms", not_measured),
            (
                "mutation latency p50",
                m.mutation_p50_ms,
                500.0,
                "ms",
                not_measured,
            ),
            (
                "active connections",
                metrics.map(|m| m.connections as f64),
                10_000.0,
                "",
                not_measured,
            ),
            (
                "storage of quota",
                m.storage_max_quota_pct,
                80.0,
                "%",
                "no tenant has a quota",
            ),
            // Failed queries, mutations and job runs over those run in the last minute.
            (
                "function errors (1m)",
                state.function_error_pct(),
                1.0,
                "%",
                not_measured,
            ),
        ];
        checks
            .iter()
            .map(|(name, value, limit, unit, why)| {
                let (mark, style, shown) = match value {
                    None if metrics.is_none() => ("     ", theme.dim(), "no data yet".to_string()),
                    None => ("n/a  ", theme.dim(), why.to_string()),
                    Some(v) if v > limit => ("ALERT", theme.bad(), figure(*v, unit)),
                    Some(v) => ("ok   ", theme.ok(), figure(*v, unit)),
                };
                Line::from(vec![
                    Span::styled(format!(" {mark} "), style),
                    Span::raw(format!("{name:<22} > {limit:<6}{unit:<3}")),
                    Span::styled(shown, style),
                ])
            })
            .collect()
    };
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title("Alerts (product page thresholds)")),
        alerts,
    );

    let h = &state.history;
    let series: [(&str, Option<&VecDeque<u64>>, &str); 5] = [
        ("connections", Some(&h.connections), ""),
        ("requests", h.throughput.as_ref(), "/s"),
        ("query p50", h.latency_ms.as_ref(), " ms"),
        ("errors", Some(&h.error_rate), "/s"),
        ("repl. lag", Some(&h.replication_lag), " B"),
    ];
    let block = Block::bordered().title("Last 2 minutes");
    let inner = block.inner(sparks);
    frame.render_widget(block, sparks);
    let rows = Layout::vertical(vec![Constraint::Length(1); series.len()]).split(inner);
    for ((name, data, unit), row) in series.iter().zip(rows.iter()) {
        let [label, spark, value] =
            Layout::horizontal([Constraint::Length(13), Constraint::Min(5), Constraint::Length(14)])
                .areas(*row);
        frame.render_widget(Paragraph::new(format!(" {name}")), label);
        match data {
            Some(d) if !d.is_empty() => {
                let tail: Vec<u64> = d
                    .iter()
                    .skip(d.len().saturating_sub(spark.width as usize))
                    .copied()
                    .collect();
                frame.render_widget(Sparkline::default().data(&tail).style(theme.accent()), spark);
                let last = if *unit == " B" {
                    bytes(*d.back().unwrap_or(&0) as i64)
                } else {
                    format!("{}{unit}", d.back().unwrap_or(&0))
                };
                frame.render_widget(Paragraph::new(last).alignment(Alignment::Right), value);
            }
            Some(_) => {
                frame.render_widget(Paragraph::new(Span::styled("no samples yet", theme.dim())), spark)
            }
            None => frame.render_widget(
                Paragraph::new(Span::styled("not measured by this pulsed", theme.dim())),
                spark,
            ),
        }
    }
}

fn presence(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    let Some(report) = ready(&state.presence, state, theme, frame, area, "Presence") else {
        return;
    };
    let [left, right] = Layout::horizontal([Constraint::Length(24), Constraint::Min(20)]).areas(area);
    let focus = state.focus();
    let tenants = state.presence_tenants();
    let tcursor = state.cursor_of(Screen::Presence, Pane::First);
    let height = left.height.saturating_sub(2) as usize;
    let trows = window(tenants.len(), tcursor, height).map(|i| {
        let (tenant, online) = &tenants[i];
        let chosen = *tenant == state.presence_tenant;
        let name = tenant.clone().unwrap_or_else(|| "(all tenants)".into());
        let row = Row::new(vec![
            Cell::from(format!("{}{name}", if chosen { "▸" } else { " " })),
            Cell::from(online.to_string()),
        ]);
        pick(row, i == tcursor && focus == Pane::First, theme)
    });
    frame.render_widget(
        Table::new(trows, [Constraint::Min(10), Constraint::Length(6)]).block(titled(
            title_of("Tenants".into(), &state.presence, theme),
            focus == Pane::First,
            theme,
        )),
        left,
    );

    let ucursor = state.cursor_of(Screen::Presence, Pane::Second);
    let height = right.height.saturating_sub(3) as usize;
    let range = window(state.presence_rows.len(), ucursor, height);
    let urows = state.presence_rows[range.clone()]
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let u = &report.users[i];
            let row = Row::new(vec![
                Cell::from(u.user.as_str()),
                Cell::from(u.tenant.as_str()),
                Cell::from(u.resource.as_str()),
                Cell::from(u.state.as_str()),
                Cell::from(u.last_seen_secs.map_or("-".into(), |s| format!("{s}s"))),
            ]);
            pick(row, range.start + k == ucursor && focus == Pane::Second, theme)
        });
    let title = format!(
        "Online: {} of {}{}",
        state.presence_rows.len(),
        report.users.len(),
        if state.filter().is_empty() {
            String::new()
        } else {
            format!(" · filter {:?}", state.filter())
        }
    );
    draw_table(
        frame,
        right,
        urows,
        &[
            Constraint::Min(10),
            Constraint::Length(10),
            Constraint::Min(12),
            Constraint::Length(8),
            Constraint::Length(6),
        ],
        &["User", "Tenant", "Viewing", "State", "Seen"],
        titled(title, focus == Pane::Second, theme),
        theme,
    );
}

fn notifications(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    if ready(&state.notifications, state, theme, frame, area, "Notifications").is_none() {
        return;
    }
    let items = state.visible_notifications();
    let cursor = state.cursor_of(Screen::Notifications, Pane::First);
    let range = window(items.len(), cursor, area.height.saturating_sub(3) as usize);
    let rows = range.clone().map(|i| {
        let n = items[i];
        let row = Row::new(vec![
            Cell::from(n.created_at.as_str()),
            Cell::from(n.tenant.as_str()),
            Cell::from(n.user.as_str()),
            Cell::from(if n.read { "read" } else { "new" }),
            Cell::from(n.title.as_str()),
        ]);
        pick(row, i == cursor, theme)
    });
    draw_table(
        frame,
        area,
        rows,
        &[
            Constraint::Length(20),
            Constraint::Length(10),
            Constraint::Length(12),
            Constraint::Length(5),
            Constraint::Min(10),
        ],
        &["When", "Tenant", "User", "", "Title"],
        titled(
            title_of(
                format!("Notifications ({}) · / by tenant, user or title", items.len()),
                &state.notifications,
                theme,
            ),
            true,
            theme,
        ),
        theme,
    );
}

fn level_style(theme: Theme, level: LogLevel) -> Style {
    match level {
        LogLevel::Error => theme.bad(),
        LogLevel::Warn => theme.warn(),
        LogLevel::Info => theme.ok(),
        LogLevel::Debug | LogLevel::Trace => theme.dim(),
    }
}

fn logs(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    let cursor = state.cursor_of(Screen::Logs, Pane::First);
    let height = area.height.saturating_sub(2) as usize;
    if state.log_groups {
        let Some(groups) = ready(&state.log_errors, state, theme, frame, area, "Errors by kind") else {
            return;
        };
        let range = window(groups.len(), cursor, height.saturating_sub(1));
        let rows = range.clone().map(|i| {
            let g = &groups[i];
            let row = Row::new(vec![
                Cell::from(g.count.to_string()),
                Cell::from(Span::styled(g.level.as_str(), level_style(theme, g.level))),
                Cell::from(clock(g.last_at_ms)),
                Cell::from(g.kind.as_str()),
                Cell::from(g.last_fields.as_str()),
            ]);
            pick(row, i == cursor, theme)
        });
        draw_table(
            frame,
            area,
            rows,
            &[
                Constraint::Length(6),
                Constraint::Length(5),
                Constraint::Length(8),
                Constraint::Min(20),
                Constraint::Min(10),
            ],
            &["Count", "Level", "Last", "Kind", "Latest fields"],
            titled(
                format!(
                    "Errors and warnings by kind ({}) · e: back to the log",
                    groups.len()
                ),
                true,
                theme,
            ),
            theme,
        );
        return;
    }
    let visible = state.visible_logs();
    if visible.is_empty() && state.logs.is_empty() {
        placeholder(state, theme, frame, area, "Logs", state.log_errors.error.as_ref());
        return;
    }
    let range = window(visible.len(), cursor, height);
    let lines: Vec<Line<'_>> = range
        .clone()
        .map(|i| {
            let e = visible[i];
            let mut spans = vec![
                Span::styled(clock(e.at_ms), theme.dim()),
                Span::raw(" "),
                Span::styled(format!("{:<5}", e.level.as_str()), level_style(theme, e.level)),
                Span::raw(" "),
                Span::styled(format!("{}: ", e.target), theme.dim()),
                Span::raw(e.message.as_str()),
            ];
            for (k, v) in &e.fields {
                spans.push(Span::styled(format!(" {k}="), theme.accent()));
                spans.push(Span::raw(v.as_str()));
            }
            let line = Line::from(spans);
            pick(line, i == cursor, theme)
        })
        .collect();
    let title = format!(
        "Logs ≥ {} · {} of {}{}{} · l level · e errors by kind",
        state.log_level.as_str(),
        visible.len(),
        state.logs.len(),
        if state.filter().is_empty() {
            String::new()
        } else {
            format!(" · search {:?}", state.filter())
        },
        if state.log_dropped > 0 {
            format!(" · {} missed", state.log_dropped)
        } else {
            String::new()
        },
    );
    frame.render_widget(Paragraph::new(lines).block(titled(title, true, theme)), area);
}

fn data(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    // The feed keeps at least 6 lines (4 changes) at 80x24.
    let [top, bottom] = Layout::vertical([Constraint::Percentage(55), Constraint::Min(6)]).areas(area);
    let [left, right] = Layout::horizontal([Constraint::Length(38), Constraint::Min(20)]).areas(top);
    if state.tables.data.is_none() && state.live.data.is_none() {
        let error = state.tables.error.as_ref().or(state.live.error.as_ref());
        placeholder(state, theme, frame, left, "Tables", error);
    } else {
        table_list(state, theme, frame, left);
    }
    match (&state.open_table, &state.table_rows.data) {
        (None, _) => frame.render_widget(
            Paragraph::new(Span::styled(
                "Choose a table (or one tenant of a live table) and press Enter to see its rows.",
                theme.dim(),
            ))
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title("Rows")),
            right,
        ),
        (Some(opened), None) => {
            let name = match opened {
                Opened::Pulse(name) | Opened::Live { table: name, .. } => name,
            };
            placeholder(state, theme, frame, right, name, state.table_rows.error.as_ref())
        }
        (Some(opened), Some(t)) => {
            let title = match opened {
                Opened::Pulse(_) => format!("{} · latest {}", t.table, t.rows.len()),
                Opened::Live { tenant, .. } => format!(
                    "{}{} · rows {}–{} · [ ]",
                    t.table,
                    tenant.as_ref().map(|t| format!("/{t}")).unwrap_or_default(),
                    if t.rows.is_empty() { t.offset } else { t.offset + 1 },
                    t.offset as usize + t.rows.len(),
                ),
            };
            rows_table(state, theme, frame, right, t, title);
        }
    }
    change_feed(state, theme, frame, bottom);
}

/// The `pulse` tables, then the live tables with their tenants.
fn table_list(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    let focus = state.focus();
    let items = state.data_items();
    let cursor = state.cursor_of(Screen::Data, Pane::First);
    let range = window(items.len(), cursor, area.height.saturating_sub(3) as usize);
    let pulse = state.tables.data.as_deref().unwrap_or_default();
    let live = state.live.data.as_deref().unwrap_or_default();
    let opened = state.open_table.as_ref();
    let rows = range.clone().map(|i| {
        let (name, rows, size, open) = match items[i] {
            DataItem::Pulse(k) => {
                let t = &pulse[k];
                (
                    t.name.strip_prefix("pulse.").unwrap_or(&t.name).to_string(),
                    t.rows.to_string(),
                    bytes(t.bytes),
                    opened == Some(&Opened::Pulse(t.name.clone())),
                )
            }
            DataItem::Live(k) => {
                let t = &live[k];
                (
                    format!("» {}", t.name),
                    if t.estimated {
                        format!("~{:.1}M", t.rows as f64 / 1e6)
                    } else {
                        t.rows.to_string()
                    },
                    "live".to_string(),
                    matches!(opened, Some(Opened::Live { table, tenant: None }) if *table == t.name),
                )
            }
            DataItem::LiveTenant(k, j) => {
                let (t, tenant) = (&live[k], &live[k].tenants[j]);
                (
                    format!("   {}", tenant.tenant),
                    tenant.rows.to_string(),
                    String::new(),
                    matches!(opened, Some(Opened::Live { table, tenant: Some(x) })
                        if *table == t.name && *x == tenant.tenant),
                )
            }
        };
        let row = Row::new(vec![
            Cell::from(format!("{}{name}", if open { "▸" } else { " " })),
            Cell::from(rows),
            Cell::from(Span::styled(size, theme.dim())),
        ]);
        pick(row, i == cursor && focus == Pane::First, theme)
    });
    let mut title = title_of("Tables · » live · Enter".into(), &state.tables, theme);
    if let Some(e) = &state.live.error {
        title
            .spans
            .push(Span::styled(format!(" live: {} ", e.code), theme.bad()));
    }
    draw_table(
        frame,
        area,
        rows,
        &[Constraint::Min(16), Constraint::Length(7), Constraint::Length(9)],
        &["Table", "Rows", "Size"],
        titled(title, focus == Pane::First, theme),
        theme,
    );
}

/// Rows of a table, each column as wide as its longest value (up to 24).
fn rows_table(
    state: &State,
    theme: Theme,
    frame: &mut Frame<'_>,
    area: Rect,
    t: &pulse_shared::admin::TableRows,
    title: String,
) {
    let focus = state.focus();
    let cursor = state.cursor_of(Screen::Data, Pane::Second);
    let range = window(t.rows.len(), cursor, area.height.saturating_sub(3) as usize);
    let widths: Vec<Constraint> = t
        .columns
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let longest = t
                .rows
                .iter()
                .map(|r| r.get(c).map_or(0, |v| v.chars().count()))
                .max()
                .unwrap_or(0)
                .max(name.len());
            Constraint::Length(longest.min(24) as u16)
        })
        .collect();
    let rows = range.clone().map(|i| {
        let row = Row::new(t.rows[i].iter().map(|v| Cell::from(v.as_str())));
        pick(row, i == cursor && focus == Pane::Second, theme)
    });
    frame.render_widget(
        Table::new(rows, widths)
            .header(Row::new(t.columns.iter().map(|c| Cell::from(c.as_str()))).style(theme.header()))
            .block(titled(
                title_of(title, &state.table_rows, theme),
                focus == Pane::Second,
                theme,
            )),
        area,
    );
}

/// The latest committed changes, newest first, live unless paused.
fn change_feed(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    if state.changes.is_empty()
        && let Some(e) = &state.feed_error
    {
        placeholder(state, theme, frame, area, "Latest changes", Some(e));
        return;
    }
    let visible = state.visible_changes();
    let height = area.height.saturating_sub(2) as usize;
    let op_style = |op: &str| match op {
        "insert" => theme.ok(),
        "update" => theme.accent(),
        _ => theme.warn(),
    };
    let lines: Vec<Line<'_>> = visible
        .iter()
        .rev()
        .take(height)
        .map(|c| {
            // RFC 3339: the time of day is characters 11..19.
            let at = c.commit_time.get(11..19).unwrap_or(&c.commit_time);
            let mut spans = vec![
                Span::styled(format!("{at} {} x{} ", c.lsn, c.xid), theme.dim()),
                Span::styled(format!("{:<6} ", c.op), op_style(&c.op)),
                Span::raw(format!("{} ", c.table)),
                Span::styled(c.key.as_str(), theme.header()),
            ];
            for (k, v) in &c.columns {
                spans.push(Span::styled(format!(" {k}="), theme.accent()));
                spans.push(Span::raw(v.as_str()));
            }
            Line::from(spans)
        })
        .collect();
    let mut title = vec![Span::raw(format!(
        "Latest changes ({}{})",
        visible.len(),
        if state.filter().is_empty() {
            String::new()
        } else {
            format!(" matching {:?}", state.filter())
        }
    ))];
    if state.feed_paused {
        title.push(Span::styled(
            format!(" PAUSED · {} new · p resumes ", state.held.len()),
            theme.warn().add_modifier(Modifier::BOLD),
        ));
    } else {
        title.push(Span::raw(" · live · p pauses "));
    }
    if state.feed_missed > 0 {
        title.push(Span::styled(
            format!(" {} missed ", state.feed_missed),
            theme.warn(),
        ));
    }
    let body = if lines.is_empty() {
        vec![Line::styled(
            if state.watching {
                "No change committed since pulsed started; changes appear here as they commit."
            } else {
                "The feed starts when pulsed answers."
            },
            theme.dim(),
        )]
    } else {
        lines
    };
    frame.render_widget(
        Paragraph::new(body).block(Block::bordered().title(Line::from(title))),
        area,
    );
}

fn storage(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    let Some(report) = ready(&state.storage, state, theme, frame, area, "Storage") else {
        return;
    };
    let [top, bottom] = Layout::vertical([Constraint::Percentage(55), Constraint::Min(4)]).areas(area);
    let cursor = state.cursor_of(Screen::Storage, Pane::First);
    let rows = report.tenants.iter().enumerate().map(|(i, t)| {
        let pct = if t.quota_bytes > 0 {
            t.used_bytes as f64 * 100.0 / t.quota_bytes as f64
        } else {
            0.0
        };
        let bar_len = (pct / 10.0).round().clamp(0.0, 10.0) as usize;
        let style = if pct > 80.0 { theme.bad() } else { theme.ok() };
        let row = Row::new(vec![
            Cell::from(t.tenant.as_str()),
            Cell::from(bytes(t.used_bytes as i64)),
            Cell::from(if t.quota_bytes > 0 {
                bytes(t.quota_bytes as i64)
            } else {
                "none".into()
            }),
            Cell::from(Span::styled(
                format!("{}{} {pct:>3.0}%", "█".repeat(bar_len), "·".repeat(10 - bar_len)),
                style,
            )),
            Cell::from(t.files.to_string()),
        ]);
        pick(row, i == cursor, theme)
    });
    draw_table(
        frame,
        top,
        rows,
        &[
            Constraint::Min(10),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(16),
            Constraint::Length(7),
        ],
        &["Tenant", "Used", "Quota", "Of quota", "Files"],
        titled(
            title_of("Usage per tenant".into(), &state.storage, theme),
            true,
            theme,
        ),
        theme,
    );
    let rows = report.largest.iter().map(|f| {
        Row::new(vec![
            Cell::from(bytes(f.bytes as i64)),
            Cell::from(f.tenant.as_str()),
            Cell::from(f.name.as_str()),
            Cell::from(f.uploaded_at.as_str()),
        ])
    });
    draw_table(
        frame,
        bottom,
        rows,
        &[
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Min(12),
            Constraint::Length(20),
        ],
        &["Size", "Tenant", "File", "Uploaded"],
        Block::bordered().title("Largest files"),
        theme,
    );
}

fn jobs(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    let Some(report) = ready(&state.jobs, state, theme, frame, area, "Jobs") else {
        return;
    };
    let [top, middle, bottom] = Layout::vertical([
        Constraint::Percentage(35),
        Constraint::Percentage(35),
        Constraint::Min(4),
    ])
    .areas(area);
    let focus = state.focus();
    let cursor = state.cursor_of(Screen::Jobs, Pane::First);
    let rows = report.jobs.iter().enumerate().map(|(i, j)| {
        let row = Row::new(vec![
            Cell::from(j.name.as_str()),
            Cell::from(j.schedule.as_str()),
            Cell::from(j.next_run.clone().unwrap_or_else(|| "-".into())),
            Cell::from(j.last_status.clone().unwrap_or_else(|| "never run".into())),
        ]);
        pick(row, i == cursor && focus == Pane::First, theme)
    });
    let hint = if state.can_run_jobs {
        " · Enter run now"
    } else {
        " · read-only"
    };
    draw_table(
        frame,
        top,
        rows,
        &[
            Constraint::Min(12),
            Constraint::Length(14),
            Constraint::Length(20),
            Constraint::Min(10),
        ],
        &["Job", "Schedule", "Next run", "Last"],
        titled(
            title_of(format!("Jobs{hint}"), &state.jobs, theme),
            focus == Pane::First,
            theme,
        ),
        theme,
    );
    let rows = report.history.iter().map(|r| {
        let style = if r.status == "ok" { theme.ok() } else { theme.bad() };
        Row::new(vec![
            Cell::from(r.started_at.as_str()),
            Cell::from(r.job.as_str()),
            Cell::from(Span::styled(r.status.as_str(), style)),
            Cell::from(r.duration_ms.map_or("-".into(), |d| format!("{d} ms"))),
            Cell::from(r.message.as_str()),
        ])
    });
    draw_table(
        frame,
        middle,
        rows,
        &[
            Constraint::Length(20),
            Constraint::Length(12),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Min(10),
        ],
        &["Started", "Job", "Status", "Took", "Message"],
        Block::bordered().title("History"),
        theme,
    );
    let dcursor = state.cursor_of(Screen::Jobs, Pane::Second);
    let rows = report.dead_letters.iter().enumerate().map(|(i, d)| {
        let row = Row::new(vec![
            Cell::from(d.at.as_str()),
            Cell::from(d.source.as_str()),
            Cell::from(d.reason.as_str()),
        ]);
        pick(row, i == dcursor && focus == Pane::Second, theme)
    });
    draw_table(
        frame,
        bottom,
        rows,
        &[
            Constraint::Length(20),
            Constraint::Length(16),
            Constraint::Min(10),
        ],
        &["At", "Source", "Reason"],
        titled(
            format!(
                "Dead letters ({}){}",
                report.dead_letters.len(),
                if state.can_run_jobs {
                    " · Enter requeue"
                } else {
                    ""
                }
            ),
            focus == Pane::Second,
            theme,
        ),
        theme,
    );
}

fn replication(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    let Some(report) = ready(&state.replication, state, theme, frame, area, "Replication") else {
        return;
    };
    let [info, detail, slots, senders, lag] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(4),
        Constraint::Length(5),
        Constraint::Length(3),
    ])
    .areas(area);
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(format!(" current WAL {}", report.current_lsn), theme.header()),
            Span::raw(format!(
                " · {} slots · {} senders",
                report.slots.len(),
                report.senders.len()
            )),
        ])),
        info,
    );
    let cursor = state.cursor_of(Screen::Replication, Pane::First);
    // Positions of the selected slot, which the table has no room for.
    if let Some(s) = report.slots.get(cursor) {
        let plugin = if s.plugin.is_empty() {
            "physical"
        } else {
            s.plugin.as_str()
        };
        frame.render_widget(
            Paragraph::new(Span::styled(
                format!(
                    " {}: {plugin} · restart {} · confirmed {}",
                    s.name,
                    s.restart_lsn.as_deref().unwrap_or("-"),
                    s.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                ),
                theme.dim(),
            )),
            detail,
        );
    }
    let rows = report.slots.iter().enumerate().map(|(i, s)| {
        let rate = state
            .slot_rates
            .iter()
            .find(|(n, _)| *n == s.name)
            .map_or("-".to_string(), |(_, r)| format!("{}/s", bytes(*r as i64)));
        let status = s.wal_status.clone().unwrap_or_else(|| "-".into());
        let status_style = match status.as_str() {
            "lost" => theme.bad(),
            "unreserved" | "extended" => theme.warn(),
            _ => theme.ok(),
        };
        let row = Row::new(vec![
            Cell::from(s.name.as_str()),
            Cell::from(s.database.as_str()),
            Cell::from(if s.active { "yes" } else { "no" }),
            Cell::from(s.confirmed_flush_lsn.clone().unwrap_or_else(|| "-".into())),
            Cell::from(s.lag_bytes.map_or("-".into(), bytes)),
            Cell::from(s.retained_bytes.map_or("-".into(), bytes)),
            Cell::from(Span::styled(status, status_style)),
            Cell::from(rate),
        ]);
        pick(row, i == cursor, theme)
    });
    draw_table(
        frame,
        slots,
        rows,
        &[
            Constraint::Min(10),
            Constraint::Length(8),
            Constraint::Length(3),
            Constraint::Length(11),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(12),
        ],
        &[
            "Slot",
            "Database",
            "On",
            "Confirmed",
            "Lag",
            "Retained",
            "WAL",
            "Rate",
        ],
        titled(title_of("Slots".into(), &state.replication, theme), true, theme),
        theme,
    );
    let rows = report.senders.iter().map(|s| {
        Row::new(vec![
            Cell::from(s.application.as_str()),
            Cell::from(s.state.as_str()),
            Cell::from(s.sent_lsn.clone().unwrap_or_default()),
            Cell::from(s.flush_lsn.clone().unwrap_or_default()),
            Cell::from(s.flush_lag_ms.map_or("-".into(), |ms| format!("{ms:.0} ms"))),
        ])
    });
    draw_table(
        frame,
        senders,
        rows,
        &[
            Constraint::Min(12),
            Constraint::Length(10),
            Constraint::Length(12),
            Constraint::Length(12),
            Constraint::Length(10),
        ],
        &["Sender", "State", "Sent", "Flushed", "Flush lag"],
        Block::bordered().title("WAL senders"),
        theme,
    );
    let block = Block::bordered().title("Largest slot lag");
    let inner = block.inner(lag);
    frame.render_widget(block, lag);
    let d = &state.history.replication_lag;
    let tail: Vec<u64> = d
        .iter()
        .skip(d.len().saturating_sub(inner.width as usize))
        .copied()
        .collect();
    frame.render_widget(Sparkline::default().data(&tail).style(theme.accent()), inner);
}

fn settings(state: &State, theme: Theme, frame: &mut Frame<'_>, area: Rect) {
    let [top, bottom] = Layout::vertical([Constraint::Length(8), Constraint::Min(4)]).areas(area);
    let focus = state.focus();
    if let Some(entries) = ready(&state.settings, state, theme, frame, top, "Platform settings") {
        let cursor = state.cursor_of(Screen::Settings, Pane::First);
        let rows = entries.iter().enumerate().map(|(i, e)| {
            let row = Row::new(vec![
                Cell::from(e.label.as_str()),
                Cell::from(e.value.as_str()),
                Cell::from(Span::styled(e.source.as_str(), theme.dim())),
            ]);
            pick(row, i == cursor && focus == Pane::First, theme)
        });
        let hint = if state.read_only {
            "Platform settings · read-only (no settings capability)"
        } else {
            "Platform settings · Enter edit · R rotate deploy key"
        };
        draw_table(
            frame,
            top,
            rows,
            &[
                Constraint::Length(17),
                Constraint::Length(28),
                Constraint::Min(10),
            ],
            &["Setting", "Value", "Source"],
            titled(
                title_of(hint.into(), &state.settings, theme),
                focus == Pane::First,
                theme,
            ),
            theme,
        );
    }
    if ready(
        &state.config,
        state,
        theme,
        frame,
        bottom,
        "Configuration in effect",
    )
    .is_some()
    {
        let entries = state.visible_config();
        let cursor = state.cursor_of(Screen::Settings, Pane::Second);
        let range = window(entries.len(), cursor, bottom.height.saturating_sub(3) as usize);
        let rows = range.clone().map(|i| {
            let e = entries[i];
            let row = Row::new(vec![
                Cell::from(e.key.as_str()),
                Cell::from(e.value.as_str()),
                Cell::from(Span::styled(e.source.as_str(), theme.dim())),
            ]);
            pick(row, i == cursor && focus == Pane::Second, theme)
        });
        draw_table(
            frame,
            bottom,
            rows,
            &[
                Constraint::Length(30),
                Constraint::Length(26),
                Constraint::Min(12),
            ],
            &["Key", "Value", "Source"],
            titled(
                title_of(
                    format!("Configuration in effect ({}) · secrets masked", entries.len()),
                    &state.config,
                    theme,
                ),
                focus == Pane::Second,
                theme,
            ),
            theme,
        );
    }
}

fn centered(frame: &Frame<'_>, width: u16, height: u16) -> Rect {
    let area = frame.area();
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn dialog(frame: &mut Frame<'_>, title: &str, lines: Vec<Line<'_>>, theme: Theme) {
    // Wide enough for a 64-character deploy key on one line.
    let width = 72;
    let inner = width as usize - 2;
    let height = lines
        .iter()
        .map(|l| l.width().max(1).div_ceil(inner) as u16)
        .sum::<u16>()
        + 2;
    let area = centered(frame, width, height);
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: false }).block(
            Block::bordered()
                .title(title.to_string())
                .border_style(theme.accent()),
        ),
        area,
    );
}

fn confirm_dialog(pending: &Pending, theme: Theme, frame: &mut Frame<'_>) {
    let question = match pending {
        Pending::Setting {
            label,
            value,
            secret: true,
            ..
        } => format!(
            "Set {label} to the new value ({} characters, not shown)?",
            value.len()
        ),
        Pending::Setting { label, value, .. } => format!("Set {label} to {value}?"),
        Pending::Rotate => "Replace the deploy key with a new random one? Services using the old key \
             (Symfony) lose access until they are given the new one."
            .to_string(),
        Pending::RunJob(name) => format!("Run job {name} now?"),
        Pending::Requeue(id) => format!("Requeue dead letter {id}?"),
    };
    dialog(
        frame,
        "Confirm",
        vec![
            Line::raw(question),
            Line::raw(""),
            Line::styled("The change is audited.  y yes · n / Esc no", theme.dim()),
        ],
        theme,
    );
}

fn edit_dialog(label: &str, kind: SettingKind, buffer: &str, theme: Theme, frame: &mut Frame<'_>) {
    let shown = if kind == SettingKind::Secret {
        "•".repeat(buffer.chars().count())
    } else {
        buffer.to_string()
    };
    let expect = match kind {
        SettingKind::Url => "an http:// or https:// URL",
        SettingKind::Secret => "at least 32 printable characters (or Esc, then R to rotate)",
        SettingKind::Toggle => "true or false",
        SettingKind::Millis => "milliseconds, 100 to 3600000",
    };
    dialog(
        frame,
        &format!("Edit {label}"),
        vec![
            Line::from(vec![
                Span::raw("> "),
                Span::styled(format!("{shown}█"), theme.accent()),
            ]),
            Line::styled(format!("Expected: {expect}"), theme.dim()),
            Line::styled("Enter check and confirm · Esc cancel", theme.dim()),
        ],
        theme,
    );
}

fn key_dialog(key: &str, theme: Theme, frame: &mut Frame<'_>) {
    dialog(
        frame,
        "New deploy key",
        vec![
            Line::raw("The deploy key was rotated. Copy it now: it is not shown again."),
            Line::raw(""),
            Line::styled(key.to_string(), theme.header()),
            Line::raw(""),
            Line::styled("Give it to Symfony (and scripts); Esc closes.", theme.dim()),
        ],
        theme,
    );
}

/// Every key, for the help overlay (and the tests that check it is complete).
pub const KEYS: [(&str, &str); 22] = [
    ("?", "open or close this help"),
    ("q, Ctrl-C", "quit"),
    ("Tab, Shift-Tab", "next, previous screen"),
    ("1-9", "go to a screen"),
    ("↑↓, j k", "move"),
    ("PgUp PgDn", "move a page"),
    ("g G, Home End", "first, last"),
    ("← →, h l", "left, right pane"),
    ("/", "filter or search this screen"),
    ("Enter", "open, choose, edit"),
    ("Esc", "clear filter, back, cancel"),
    ("r", "refresh now"),
    ("Presence: Enter", "show a tenant's users"),
    ("Logs: l", "cycle the lowest level shown"),
    ("Logs: e", "errors grouped by kind"),
    ("Logs: Enter", "the event in full"),
    ("Data: Enter", "rows of a table or tenant"),
    ("Data: [ ] p", "page live rows; pause the feed"),
    ("Jobs: Enter", "run now / requeue (confirmed)"),
    ("Settings: Enter", "edit (validated, confirmed)"),
    ("Settings: R", "rotate the deploy key"),
    ("y / n", "answer a confirmation"),
];

fn help(theme: Theme, frame: &mut Frame<'_>) {
    let lines: Vec<Line<'_>> = KEYS
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!(" {k:<17}"), theme.accent()),
                Span::raw(*what),
            ])
        })
        .collect();
    let area = centered(frame, 56, lines.len() as u16 + 2);
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::bordered()
                .title("Keys · Esc closes")
                .border_style(theme.accent()),
        ),
        area,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_the_cursor_visible() {
        assert_eq!(window(100, 0, 10), 0..10);
        assert_eq!(window(100, 9, 10), 0..10);
        assert_eq!(window(100, 10, 10), 1..11);
        assert_eq!(window(100, 99, 10), 90..100);
        assert_eq!(window(5, 3, 10), 0..5);
        assert_eq!(window(0, 0, 10), 0..0);
    }

    #[test]
    fn sizes_and_times_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(clock(3_723_000), "01:02:03");
        assert_eq!(duration(3725), "1h 02m");
    }
}
