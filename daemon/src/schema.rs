//! The declarative schema: what clients may see and do, from a TOML file beside the
//! config (`schema.path`).
//!
//! It declares live tables, dashboard metrics, the notification source table, mutation
//! argument types, tenant time zones and the mapping from Symfony role names to Pulse
//! roles. [`Schema::load`] parses the file; [`Schema::check`] compares every entry with the
//! PostgreSQL catalog and fails with an error naming the entry (`tables.members.columns`),
//! so a wrong table, column or type stops the start instead of failing later at runtime.
//! This module validates and describes; it never queries rows and never decides access
//! (that is `pulse_shared::caps::authorize`, narrowed by the roles listed here).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use chrono_tz::Tz;
use pulse_shared::Role;
use serde::Deserialize;

use crate::engine::filter::{self, Expr};

/// A schema problem: the entry (dotted path in the file) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schema {file}: {entry}: {message}")]
pub struct SchemaError {
    /// The file.
    pub file: String,
    /// The entry, for example `tables.members.columns`.
    pub entry: String,
    /// What is wrong and what to do.
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    #[serde(default)]
    roles: BTreeMap<String, String>,
    #[serde(default = "utc")]
    default_time_zone: String,
    #[serde(default)]
    time_zones: BTreeMap<String, String>,
    #[serde(default)]
    tables: BTreeMap<String, RawTable>,
    #[serde(default)]
    metrics: BTreeMap<String, RawMetric>,
    notifications: Option<RawNotifications>,
    #[serde(default)]
    mutations: BTreeMap<String, RawMutation>,
    events: Option<RawEvents>,
    users: Option<RawUsers>,
    tenants: Option<RawTenants>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenants {
    source: String,
    #[serde(default = "id")]
    id_column: String,
    #[serde(default = "timezone")]
    time_zone_column: String,
}

fn timezone() -> String {
    "timezone".into()
}

fn utc() -> String {
    "UTC".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    source: String,
    tenant_column: String,
    owner_column: Option<String>,
    columns: Vec<String>,
    roles: Vec<String>,
    #[serde(default)]
    filters: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetric {
    source: String,
    tenant_column: String,
    aggregate: String,
    column: Option<String>,
    filter: Option<String>,
    window: Option<String>,
    time_column: Option<String>,
    #[serde(default)]
    thresholds: Vec<f64>,
    #[serde(default)]
    above: Vec<f64>,
    #[serde(default)]
    below: Vec<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotifications {
    source: Option<String>,
    #[serde(default = "tenant_id")]
    tenant_column: String,
    #[serde(default = "user_id")]
    user_column: String,
    #[serde(default = "title")]
    title_column: String,
    body_column: Option<String>,
    #[serde(default = "retention")]
    retention_days: u32,
}

fn tenant_id() -> String {
    "tenant_id".into()
}
fn user_id() -> String {
    "user_id".into()
}
fn title() -> String {
    "title".into()
}
fn retention() -> u32 {
    90
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMutation {
    #[serde(default)]
    args: BTreeMap<String, String>,
    roles: Option<Vec<String>>,
    class: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvents {
    class_namespace: Option<String>,
    send: Option<BTreeMap<String, RawSend>>,
}

/// An entry of `[events.send]`: `true` (the namespace rule), `false` (not sent) or a class.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSend {
    On(bool),
    Class(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsers {
    source: String,
    #[serde(default = "id")]
    id_column: String,
    #[serde(default = "tenant_id")]
    tenant_column: String,
    roles_column: Option<String>,
    role_column: Option<String>,
}

fn id() -> String {
    "id".into()
}

/// A table's name, schema-qualified.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
}

impl TableName {
    fn parse(s: &str) -> Option<TableName> {
        let (schema, table) = s.split_once('.').unwrap_or(("public", s));
        let ok = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_');
        (ok(schema) && ok(table)).then(|| TableName {
            schema: schema.into(),
            table: table.into(),
        })
    }

    /// The name quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Quotes an identifier for SQL.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A live table clients may subscribe to.
#[derive(Debug, Clone)]
pub struct LiveTable {
    /// Its name in the schema file (what clients subscribe to).
    pub name: String,
    /// The Symfony table.
    pub source: TableName,
    /// Column holding the tenant id.
    pub tenant_column: String,
    /// Column holding the owning user id, when rows belong to users.
    pub owner_column: Option<String>,
    /// Columns clients see.
    pub columns: Vec<String>,
    /// Roles that may read it (further narrowed by the capability matrix).
    pub roles: Vec<Role>,
    /// Columns clients may filter on by equality.
    pub filters: Vec<String>,
    /// Primary key columns, from the catalog.
    pub key: Vec<String>,
    /// Catalog type name of every column of the table (filled by [`Schema::check`]).
    pub types: HashMap<String, String>,
}

/// What a metric aggregates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Aggregate {
    /// Rows.
    Count,
    /// Sum of a numeric column.
    Sum(String),
    /// Distinct non-null values of a column.
    CountDistinct(String),
}

/// A time window, in the tenant's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Since local midnight.
    Today,
    /// Since Monday, local midnight.
    ThisWeek,
    /// Since the first of the month.
    ThisMonth,
    /// Today and the N-1 days before.
    LastDays(u32),
}

impl Window {
    /// The name as the schema file writes it.
    pub fn name(self) -> String {
        match self {
            Window::Today => "today".into(),
            Window::ThisWeek => "this_week".into(),
            Window::ThisMonth => "this_month".into(),
            Window::LastDays(n) => format!("last_{n}_days"),
        }
    }

    fn parse(s: &str) -> Option<Window> {
        match s {
            "today" => Some(Window::Today),
            "this_week" => Some(Window::ThisWeek),
            "this_month" => Some(Window::ThisMonth),
            _ => {
                let n = s.strip_prefix("last_")?.strip_suffix("_days")?.parse().ok()?;
                (1..=366).contains(&n).then_some(Window::LastDays(n))
            }
        }
    }

    /// The first local date inside the window, given today's local date.
    pub fn start(self, today: chrono::NaiveDate) -> chrono::NaiveDate {
        use chrono::Datelike;
        match self {
            Window::Today => today,
            Window::ThisWeek => today - chrono::Days::new(today.weekday().num_days_from_monday() as u64),
            Window::ThisMonth => today.with_day(1).unwrap_or(today),
            Window::LastDays(n) => today - chrono::Days::new(n.saturating_sub(1) as u64),
        }
    }
}

/// A live dashboard metric.
#[derive(Debug, Clone)]
pub struct Metric {
    /// Its name in the schema file.
    pub name: String,
    /// The Symfony table.
    pub source: TableName,
    /// Column holding the tenant id.
    pub tenant_column: String,
    /// What is aggregated.
    pub aggregate: Aggregate,
    /// Which rows count.
    pub filter: Option<Expr>,
    /// The time window and the column that places a row in time.
    pub window: Option<(Window, String)>,
    /// Catalog type name of every column of the table (filled by [`Schema::check`]).
    pub types: HashMap<String, String>,
    /// Values whose crossing sends `metric.threshold_crossed`, in ascending order.
    pub thresholds: Vec<Threshold>,
    filter_src: Option<String>,
}

/// Where tenants' time zones are read (`[tenants]`): loaded from a snapshot of the
/// source, then kept live from the change stream.
#[derive(Debug, Clone)]
pub struct TenantsSource {
    /// The Symfony table.
    pub source: TableName,
    /// The tenant id column (the values metrics' tenant columns hold).
    pub id_column: String,
    /// The column holding an IANA time zone name.
    pub time_zone_column: String,
}

impl TenantsSource {
    /// A description that changes when the entry does.
    pub fn describe(&self) -> String {
        format!("{} {} {}", self.source, self.id_column, self.time_zone_column)
    }
}

/// A metric value whose crossing is announced to Symfony (`metric.threshold_crossed`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    /// The value.
    pub value: f64,
    /// Announce a rise from below it to it or above (`thresholds` and `above`).
    pub up: bool,
    /// Announce a fall from it or above to below it (`thresholds` and `below`).
    pub down: bool,
}

impl Threshold {
    /// The direction in which going from `before` to `after` crosses this threshold, when
    /// it does and that direction is announced: `"up"` or `"down"`.
    pub fn crossed(&self, before: f64, after: f64) -> Option<&'static str> {
        if self.up && before < self.value && after >= self.value {
            Some("up")
        } else if self.down && before >= self.value && after < self.value {
            Some("down")
        } else {
            None
        }
    }
}

/// Where notifications come from through the change stream.
#[derive(Debug, Clone)]
pub struct NotificationSource {
    /// The Symfony table; each inserted row becomes a notification.
    pub source: TableName,
    /// Tenant column.
    pub tenant_column: String,
    /// Recipient column.
    pub user_column: String,
    /// Title column.
    pub title_column: String,
    /// Body column (default: `body`, when the table has one).
    pub body_column: Option<String>,
}

/// The type of a mutation argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgType {
    /// Catalog-style type name: text, int8, float8, bool, uuid, timestamptz, date, jsonb.
    pub name: &'static str,
    /// Whether the argument may be missing or null.
    pub optional: bool,
}

const ARG_TYPES: &[&str] = &[
    "text",
    "int8",
    "float8",
    "bool",
    "uuid",
    "timestamptz",
    "date",
    "jsonb",
];

impl ArgType {
    fn parse(s: &str) -> Option<ArgType> {
        let (base, optional) = match s.strip_suffix('?') {
            Some(b) => (b, true),
            None => (s, false),
        };
        let base = match base {
            "string" => "text",
            "int" | "integer" => "int8",
            "float" | "number" => "float8",
            "boolean" => "bool",
            "json" => "jsonb",
            other => other,
        };
        ARG_TYPES
            .iter()
            .find(|t| **t == base)
            .map(|name| ArgType { name, optional })
    }
}

/// A mutation declared in the schema: Pulse validates it and hands it to Symfony as the
/// outbox event `mutation.<name>`.
#[derive(Debug, Clone)]
pub struct Mutation {
    /// Name.
    pub name: String,
    /// Argument name to type.
    pub args: BTreeMap<String, ArgType>,
    /// Roles that may call it (services always may); default every user role.
    pub roles: Vec<Role>,
    /// Its outbox event and routing key, `mutation.<name>`.
    pub event: &'static str,
}

/// Where the users of a tenant and their roles are read (Symfony's user table), for
/// notifications sent to a tenant or a role.
#[derive(Debug, Clone)]
pub struct UsersSource {
    /// The Symfony table.
    pub source: TableName,
    /// The user id column.
    pub id_column: String,
    /// The tenant column.
    pub tenant_column: String,
    /// The column holding the user's Symfony role names.
    pub roles: RolesColumn,
}

/// How a user's Symfony roles are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolesColumn {
    /// A list of role names: json/jsonb array (Symfony's `roles` column) or a text array.
    List(String),
    /// One role name per user.
    Single(String),
}

impl Mutation {
    /// Validates arguments: every declared argument present with its type, nothing
    /// undeclared. The error names the field.
    pub fn validate(&self, args: &serde_json::Value) -> Result<(), (String, String)> {
        let empty = serde_json::Map::new();
        let obj = match args {
            serde_json::Value::Object(o) => o,
            serde_json::Value::Null => &empty,
            _ => return Err(("args".into(), "must be an object".into())),
        };
        for k in obj.keys() {
            if !self.args.contains_key(k) {
                return Err((
                    format!("args.{k}"),
                    format!("{} takes no argument {k:?}", self.name),
                ));
            }
        }
        for (name, ty) in &self.args {
            let v = obj.get(name).unwrap_or(&serde_json::Value::Null);
            if v.is_null() {
                if ty.optional {
                    continue;
                }
                return Err((format!("args.{name}"), format!("is required ({})", ty.name)));
            }
            let fits = match ty.name {
                "text" => v.is_string(),
                "int8" => v.is_i64(),
                "float8" => v.is_number(),
                "bool" => v.is_boolean(),
                "jsonb" => true,
                other => crate::engine::value::from_json(other, v).is_some(),
            };
            if !fits {
                return Err((format!("args.{name}"), format!("must be a {}", ty.name)));
            }
        }
        Ok(())
    }
}

/// The validated schema.
#[derive(Debug, Clone)]
pub struct Schema {
    /// The file it came from.
    pub file: String,
    /// Symfony role name to Pulse role.
    pub roles: HashMap<String, Role>,
    /// Time zone of tenants not listed in `time_zones`.
    pub default_time_zone: Tz,
    /// Per-tenant time zones.
    pub time_zones: HashMap<String, Tz>,
    /// Live tables by name.
    pub tables: BTreeMap<String, LiveTable>,
    /// Metrics by name.
    pub metrics: BTreeMap<String, Metric>,
    /// The notification source, when configured.
    pub notifications: Option<NotificationSource>,
    /// Notification retention.
    pub notification_retention_days: u32,
    /// Mutations by name.
    pub mutations: BTreeMap<String, Mutation>,
    /// Which events are sent to Symfony and the PHP class of each (`[events]`).
    pub events: crate::outbox::EventCatalog,
    /// Symfony's user table, when declared (`[users]`).
    pub users: Option<UsersSource>,
    /// The table of tenants' time zones, when declared (`[tenants]`).
    pub tenants: Option<TenantsSource>,
}

impl Default for Schema {
    fn default() -> Self {
        Schema {
            file: "(none)".into(),
            roles: default_roles(),
            default_time_zone: Tz::UTC,
            time_zones: HashMap::new(),
            tables: BTreeMap::new(),
            metrics: BTreeMap::new(),
            notifications: None,
            notification_retention_days: 90,
            mutations: BTreeMap::new(),
            events: crate::outbox::EventCatalog::default(),
            users: None,
            tenants: None,
        }
    }
}

/// The role mapping when the file has none: the usual Symfony names.
fn default_roles() -> HashMap<String, Role> {
    [
        ("ROLE_SUPER_ADMIN", Role::PlatformAdmin),
        ("ROLE_ADMIN", Role::TenantAdmin),
        ("ROLE_STAFF", Role::Staff),
        ("ROLE_USER", Role::Member),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl Schema {
    /// Reads and parses the file (no catalog check yet).
    pub fn load(path: &Path) -> Result<Schema, SchemaError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SchemaError {
            file: file.clone(),
            entry: "(file)".into(),
            message: format!("cannot read it: {e}; set schema.path to the schema TOML file"),
        })?;
        Schema::parse(&file, &text)
    }

    /// Parses schema text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Schema, SchemaError> {
        let err = |entry: String, message: String| SchemaError {
            file: file.to_string(),
            entry,
            message,
        };
        let raw: RawSchema = toml::from_str(text).map_err(|e| {
            let entry = e
                .span()
                .map(|s| format!("line {}", text[..s.start.min(text.len())].lines().count().max(1)))
                .unwrap_or_else(|| "(file)".into());
            err(entry, e.message().to_string())
        })?;
        let role = |entry: String, name: &str| {
            Role::parse(name).ok_or_else(|| {
                err(
                    entry,
                    format!("unknown role {name:?}; expected platform_admin, tenant_admin, staff, member or service"),
                )
            })
        };
        let table_name = |entry: String, s: &str| {
            TableName::parse(s)
                .ok_or_else(|| err(entry, format!("{s:?} is not a table name such as public.members")))
        };
        let tz = |entry: String, s: &str| {
            s.parse::<Tz>().map_err(|_| {
                err(
                    entry,
                    format!("{s:?} is not an IANA time zone such as Europe/Paris"),
                )
            })
        };
        let mut roles = if raw.roles.is_empty() {
            default_roles()
        } else {
            HashMap::new()
        };
        for (symfony, pulse) in &raw.roles {
            roles.insert(symfony.clone(), role(format!("roles.{symfony}"), pulse)?);
        }
        let default_time_zone = tz("default_time_zone".into(), &raw.default_time_zone)?;
        let mut time_zones = HashMap::new();
        for (tenant, zone) in &raw.time_zones {
            time_zones.insert(tenant.clone(), tz(format!("time_zones.{tenant}"), zone)?);
        }
        let mut tables = BTreeMap::new();
        for (name, t) in raw.tables {
            let at = |k: &str| format!("tables.{name}.{k}");
            if t.columns.is_empty() {
                return Err(err(at("columns"), "list at least one visible column".into()));
            }
            let roles = t
                .roles
                .iter()
                .map(|r| role(at("roles"), r))
                .collect::<Result<Vec<_>, _>>()?;
            for f in &t.filters {
                if !t.columns.contains(f) {
                    return Err(err(
                        at("filters"),
                        format!("{f:?} is not one of the visible columns"),
                    ));
                }
            }
            tables.insert(
                name.clone(),
                LiveTable {
                    source: table_name(at("source"), &t.source)?,
                    name: name.clone(),
                    tenant_column: t.tenant_column,
                    owner_column: t.owner_column,
                    columns: t.columns,
                    roles,
                    filters: t.filters,
                    key: Vec::new(),
                    types: HashMap::new(),
                },
            );
        }
        let mut metrics = BTreeMap::new();
        for (name, m) in raw.metrics {
            let at = |k: &str| format!("metrics.{name}.{k}");
            if name == crate::engine::hub::ONLINE_METRIC {
                return Err(err(
                    format!("metrics.{name}"),
                    "the name is taken by the built-in metric of users online; choose another".into(),
                ));
            }
            let aggregate = match (m.aggregate.as_str(), m.column) {
                ("count", None) => Aggregate::Count,
                ("count", Some(_)) => return Err(err(at("column"), "count takes no column".into())),
                ("sum", Some(c)) => Aggregate::Sum(c),
                ("count_distinct", Some(c)) => Aggregate::CountDistinct(c),
                ("sum" | "count_distinct", None) => {
                    return Err(err(at("column"), format!("{} needs a column", m.aggregate)));
                }
                (other, _) => {
                    return Err(err(
                        at("aggregate"),
                        format!("{other:?} is not count, sum or count_distinct"),
                    ));
                }
            };
            let window = match (m.window, m.time_column) {
                (None, None) => None,
                (Some(w), Some(c)) => Some((
                    Window::parse(&w).ok_or_else(|| {
                        err(
                            at("window"),
                            format!("{w:?} is not today, this_week, this_month or last_N_days"),
                        )
                    })?,
                    c,
                )),
                (Some(_), None) => return Err(err(at("time_column"), "a window needs a time_column".into())),
                (None, Some(_)) => return Err(err(at("window"), "a time_column needs a window".into())),
            };
            if let Some(f) = &m.filter {
                filter::parse(f).map_err(|e| err(at("filter"), e))?;
            }
            let mut thresholds: Vec<Threshold> = Vec::new();
            for (key, list, up, down) in [
                ("thresholds", &m.thresholds, true, true),
                ("above", &m.above, true, false),
                ("below", &m.below, false, true),
            ] {
                for &value in list {
                    if !value.is_finite() {
                        return Err(err(at(key), format!("{value} is not a number")));
                    }
                    match thresholds.iter_mut().find(|t| t.value == value) {
                        Some(t) => {
                            t.up |= up;
                            t.down |= down;
                        }
                        None => thresholds.push(Threshold { value, up, down }),
                    }
                }
            }
            thresholds.sort_by(|a, b| a.value.total_cmp(&b.value));
            metrics.insert(
                name.clone(),
                Metric {
                    name: name.clone(),
                    source: table_name(at("source"), &m.source)?,
                    tenant_column: m.tenant_column,
                    aggregate,
                    filter: None,
                    window,
                    types: HashMap::new(),
                    thresholds,
                    filter_src: m.filter,
                },
            );
        }
        let (notifications, notification_retention_days) = match raw.notifications {
            None => (None, 90),
            Some(n) => {
                if n.retention_days == 0 {
                    return Err(err(
                        "notifications.retention_days".into(),
                        "must be at least 1".into(),
                    ));
                }
                let src = match n.source {
                    None => None,
                    Some(s) => Some(NotificationSource {
                        source: table_name("notifications.source".into(), &s)?,
                        tenant_column: n.tenant_column,
                        user_column: n.user_column,
                        title_column: n.title_column,
                        body_column: n.body_column,
                    }),
                };
                (src, n.retention_days)
            }
        };
        let mut mutations = BTreeMap::new();
        let mut mutation_classes = Vec::new();
        for (name, m) in raw.mutations {
            let mut args = BTreeMap::new();
            for (arg, ty) in m.args {
                let parsed = ArgType::parse(&ty).ok_or_else(|| {
                    err(
                        format!("mutations.{name}.args.{arg}"),
                        format!(
                            "{ty:?} is not a type; use one of {} (append ? when optional)",
                            ARG_TYPES.join(", ")
                        ),
                    )
                })?;
                args.insert(arg, parsed);
            }
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || name.is_empty() {
                return Err(err(
                    format!("mutations.{name}"),
                    "a mutation name is letters, digits and _ (it becomes the routing key mutation.<name>)"
                        .into(),
                ));
            }
            let roles = match &m.roles {
                None => vec![Role::PlatformAdmin, Role::TenantAdmin, Role::Staff, Role::Member],
                Some(list) => list
                    .iter()
                    .map(|r| role(format!("mutations.{name}.roles"), r))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            let event = crate::outbox::intern(&format!("mutation.{name}"));
            if let Some(class) = &m.class {
                if !crate::outbox::is_php_class(class) {
                    return Err(err(
                        format!("mutations.{name}.class"),
                        format!("{class:?} is not a PHP class name such as App\\Message\\InviteMember"),
                    ));
                }
                mutation_classes.push((event, class.clone()));
            }
            mutations.insert(
                name.clone(),
                Mutation {
                    name,
                    args,
                    roles,
                    event,
                },
            );
        }
        let events = {
            let raw = raw.events.unwrap_or(RawEvents {
                class_namespace: None,
                send: None,
            });
            let namespace = raw
                .class_namespace
                .unwrap_or_else(|| crate::outbox::DEFAULT_NAMESPACE.to_string());
            if !crate::outbox::is_php_class(&namespace) {
                return Err(err(
                    "events.class_namespace".into(),
                    format!("{namespace:?} is not a PHP namespace such as App\\Message\\Pulse"),
                ));
            }
            let mut enabled = None;
            let mut classes = Vec::new();
            if let Some(send) = raw.send {
                let mut on = Vec::new();
                for (event, what) in send {
                    let at = format!("events.send.{event:?}");
                    if event.starts_with("mutation.") {
                        return Err(err(
                            at,
                            "mutation events are sent for every declared mutation; set the class in [mutations.<name>] class".into(),
                        ));
                    }
                    let Some(known) = crate::outbox::EVENTS.iter().find(|e| **e == event) else {
                        return Err(err(
                            at,
                            format!(
                                "unknown event; the events are {} (write the name in quotes: \"presence.joined\" = true)",
                                crate::outbox::EVENTS.join(", ")
                            ),
                        ));
                    };
                    match what {
                        RawSend::On(false) => {}
                        RawSend::On(true) => on.push(*known),
                        RawSend::Class(class) => {
                            if !crate::outbox::is_php_class(&class) {
                                return Err(err(
                                    at,
                                    format!(
                                        "{class:?} is not a PHP class name such as App\\Message\\PresenceJoined"
                                    ),
                                ));
                            }
                            on.push(*known);
                            classes.push((*known, class));
                        }
                    }
                }
                enabled = Some(on);
            }
            let mut catalog = crate::outbox::EventCatalog::new(&namespace, enabled.as_deref());
            for (event, class) in classes.into_iter().chain(mutation_classes) {
                catalog = catalog.with_class(event, &class);
            }
            for m in mutations.values() {
                catalog = catalog.with_event(m.event);
            }
            catalog
        };
        let users = match raw.users {
            None => None,
            Some(u) => {
                let roles = match (u.roles_column, u.role_column) {
                    (Some(c), None) => RolesColumn::List(c),
                    (None, Some(c)) => RolesColumn::Single(c),
                    _ => {
                        return Err(err(
                            "users.roles_column".into(),
                            "give roles_column (a JSON array of Symfony role names, as Symfony stores them) or role_column (one role name), not both".into(),
                        ));
                    }
                };
                Some(UsersSource {
                    source: table_name("users.source".into(), &u.source)?,
                    id_column: u.id_column,
                    tenant_column: u.tenant_column,
                    roles,
                })
            }
        };
        let tenants = match raw.tenants {
            None => None,
            Some(t) => Some(TenantsSource {
                source: table_name("tenants.source".into(), &t.source)?,
                id_column: t.id_column,
                time_zone_column: t.time_zone_column,
            }),
        };
        Ok(Schema {
            file: file.to_string(),
            roles,
            default_time_zone,
            time_zones,
            tables,
            metrics,
            notifications,
            notification_retention_days,
            mutations,
            events,
            users,
            tenants,
        })
    }

    /// The time zone of a tenant as the file alone says: `time_zones.<tenant>`, else
    /// `default_time_zone` (see [`Schema::zone`] for the tenants table).
    pub fn time_zone(&self, tenant: &str) -> Tz {
        self.time_zones
            .get(tenant)
            .copied()
            .unwrap_or(self.default_time_zone)
    }

    /// The time zone of a tenant: pinned in the file (`time_zones.<tenant>`), else from
    /// the tenants table (`table`, as the engine follows it), else `default_time_zone`.
    pub fn zone(&self, tenant: &str, table: &HashMap<String, Tz>) -> Tz {
        self.time_zones
            .get(tenant)
            .or_else(|| table.get(tenant))
            .copied()
            .unwrap_or(self.default_time_zone)
    }

    /// A zone name from the tenants table: the zone, or `None` (with a warning when
    /// `warn`) when it is not an IANA name; the tenant then has the default zone.
    pub fn parse_zone(&self, tenant: &str, name: Option<&str>, warn: bool) -> Option<Tz> {
        let name = name?.trim();
        if name.is_empty() {
            return None;
        }
        match name.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                if !warn {
                    return None;
                }
                tracing::warn!(
                    tenant,
                    zone = name,
                    default = %self.default_time_zone,
                    "unknown time zone in the tenants table; the tenant gets the default zone"
                );
                None
            }
        }
    }

    /// What a metric's cells depend on, as (field, value) pairs in a fixed order: its
    /// table, tenant column, aggregate, filter (parsed, so spacing does not count),
    /// window, the catalog types of the columns it reads and, for windowed metrics, the
    /// time zone settings (buckets are local dates). Persisted with its SHA-256
    /// ([`Schema::fingerprint`]); a difference at start means the cells are recomputed.
    pub fn definition(&self, m: &Metric) -> Vec<(&'static str, String)> {
        let (aggregate, column) = match &m.aggregate {
            Aggregate::Count => ("count", String::new()),
            Aggregate::Sum(c) => ("sum", c.clone()),
            Aggregate::CountDistinct(c) => ("count_distinct", c.clone()),
        };
        let filter = match &m.filter_src {
            None => String::new(),
            Some(src) => match filter::parse(src) {
                Ok(e) => format!("{e:?}"),
                Err(_) => src.clone(),
            },
        };
        let types = Schema::metric_columns(m)
            .into_iter()
            .map(|c| format!("{c}:{}", m.types.get(&c).map(String::as_str).unwrap_or("?")))
            .collect::<Vec<_>>()
            .join(",");
        let mut out = vec![
            ("source", m.source.to_string()),
            ("tenant_column", m.tenant_column.clone()),
            ("aggregate", aggregate.to_string()),
            ("column", column),
            ("filter", filter),
            (
                "window",
                m.window.as_ref().map(|(w, _)| w.name()).unwrap_or_default(),
            ),
            (
                "time_column",
                m.window.as_ref().map(|(_, c)| c.clone()).unwrap_or_default(),
            ),
            ("types", types),
        ];
        if m.window.is_some() {
            let mut pinned: Vec<String> = self.time_zones.iter().map(|(t, z)| format!("{t}={z}")).collect();
            pinned.sort();
            out.push(("default_time_zone", self.default_time_zone.to_string()));
            out.push(("time_zones", pinned.join(",")));
            out.push((
                "tenants",
                self.tenants
                    .as_ref()
                    .map(TenantsSource::describe)
                    .unwrap_or_default(),
            ));
        }
        out
    }

    /// The SHA-256 (hex) of [`Schema::definition`].
    pub fn fingerprint(&self, m: &Metric) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (k, v) in self.definition(m) {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Maps Symfony role names to Pulse roles; unknown names are ignored.
    pub fn map_roles<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Vec<Role> {
        let mut out: Vec<Role> = names
            .into_iter()
            .filter_map(|n| self.roles.get(n).copied().or_else(|| Role::parse(n)))
            .filter(|r| *r != Role::Service)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Every source table the engine reads from the change stream.
    pub fn source_tables(&self) -> Vec<TableName> {
        let mut out: Vec<TableName> = self
            .tables
            .values()
            .map(|t| t.source.clone())
            .chain(self.metrics.values().map(|m| m.source.clone()))
            .chain(self.notifications.iter().map(|n| n.source.clone()))
            .chain(self.tenants.iter().map(|t| t.source.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Checks every entry against the catalog of the source database: tables exist,
    /// columns exist, sums are over numbers, filters type-check, live tables have a
    /// primary key and REPLICA IDENTITY FULL (so updates and deletes carry the old row,
    /// which is how rows leaving a filter or a tenant are seen).
    pub async fn check(&mut self, db: &tokio_postgres::Client) -> Result<(), SchemaError> {
        let file = self.file.clone();
        let err = |entry: String, message: String| SchemaError {
            file: file.clone(),
            entry,
            message,
        };
        let mut catalog: HashMap<TableName, TableInfo> = HashMap::new();
        // The users table is read at command time, not streamed: it is checked here only.
        let users_table = self.users.as_ref().map(|u| u.source.clone());
        for t in self.source_tables().into_iter().chain(users_table) {
            let info = table_info(db, &t)
                .await
                .map_err(|e| err("(catalog)".into(), format!("cannot read the catalog: {e}")))?;
            if let Some(info) = info {
                catalog.insert(t, info);
            }
        }
        let lookup = |entry: String, t: &TableName| {
            catalog
                .get(t)
                .ok_or_else(|| err(entry, format!("table {t} does not exist in the source database")))
        };
        let need_col = |entry: String, info: &TableInfo, t: &TableName, c: &str| {
            if info.types.contains_key(c) {
                Ok(())
            } else {
                Err(err(entry, format!("table {t} has no column {c:?}")))
            }
        };
        let full = |entry: String, info: &TableInfo, t: &TableName| {
            if info.replica_full {
                Ok(())
            } else {
                Err(err(
                    entry,
                    format!(
                        "table {t} needs REPLICA IDENTITY FULL so changes carry the old row: run ALTER TABLE {} REPLICA IDENTITY FULL",
                        t.quoted()
                    ),
                ))
            }
        };
        for (name, t) in self.tables.iter_mut() {
            let at = |k: &str| format!("tables.{name}.{k}");
            let info = lookup(at("source"), &t.source)?;
            need_col(at("tenant_column"), info, &t.source, &t.tenant_column)?;
            if let Some(o) = &t.owner_column {
                need_col(at("owner_column"), info, &t.source, o)?;
            }
            for c in &t.columns {
                need_col(at("columns"), info, &t.source, c)?;
            }
            if info.key.is_empty() {
                return Err(err(
                    at("source"),
                    format!("table {} has no primary key", t.source),
                ));
            }
            for k in &info.key {
                if !t.columns.contains(k) {
                    return Err(err(
                        at("columns"),
                        format!(
                            "the primary key column {k:?} must be visible so clients can tell rows apart"
                        ),
                    ));
                }
            }
            full(at("source"), info, &t.source)?;
            t.key = info.key.clone();
            t.types = info.types.clone();
        }
        for (name, m) in self.metrics.iter_mut() {
            let at = |k: &str| format!("metrics.{name}.{k}");
            let info = lookup(at("source"), &m.source)?;
            need_col(at("tenant_column"), info, &m.source, &m.tenant_column)?;
            match &m.aggregate {
                Aggregate::Count => {}
                Aggregate::CountDistinct(c) => need_col(at("column"), info, &m.source, c)?,
                Aggregate::Sum(c) => {
                    need_col(at("column"), info, &m.source, c)?;
                    let ty = &info.types[c];
                    if !matches!(
                        ty.as_str(),
                        "int2" | "int4" | "int8" | "float4" | "float8" | "numeric"
                    ) {
                        return Err(err(
                            at("column"),
                            format!("sum needs a number column; {c:?} is {ty}"),
                        ));
                    }
                }
            }
            if let Some((_, c)) = &m.window {
                need_col(at("time_column"), info, &m.source, c)?;
                let ty = &info.types[c];
                if !matches!(ty.as_str(), "timestamptz" | "timestamp" | "date") {
                    return Err(err(
                        at("time_column"),
                        format!("{c:?} is {ty}; a window needs a timestamptz, timestamp or date column"),
                    ));
                }
            }
            if let Some(src) = &m.filter_src {
                let types = &info.types;
                let bound = filter::parse(src)
                    .and_then(|e| e.bind(&|c| types.get(c).cloned()))
                    .map_err(|e| err(at("filter"), e))?;
                m.filter = Some(bound);
            }
            full(at("source"), info, &m.source)?;
            m.types = info.types.clone();
        }
        if let Some(n) = &mut self.notifications {
            let info = lookup("notifications.source".into(), &n.source)?;
            // Without body_column, a column named body is the body when there is one.
            if n.body_column.is_none() && info.types.contains_key("body") {
                n.body_column = Some("body".into());
            }
            need_col(
                "notifications.tenant_column".into(),
                info,
                &n.source,
                &n.tenant_column,
            )?;
            need_col(
                "notifications.user_column".into(),
                info,
                &n.source,
                &n.user_column,
            )?;
            need_col(
                "notifications.title_column".into(),
                info,
                &n.source,
                &n.title_column,
            )?;
            if let Some(b) = &n.body_column {
                need_col("notifications.body_column".into(), info, &n.source, b)?;
            }
        }
        if let Some(t) = &self.tenants {
            let info = lookup("tenants.source".into(), &t.source)?;
            need_col("tenants.id_column".into(), info, &t.source, &t.id_column)?;
            need_col(
                "tenants.time_zone_column".into(),
                info,
                &t.source,
                &t.time_zone_column,
            )?;
            let ty = &info.types[&t.time_zone_column];
            if !matches!(ty.as_str(), "text" | "varchar" | "bpchar" | "citext") {
                return Err(err(
                    "tenants.time_zone_column".into(),
                    format!(
                        "{:?} is {ty}; a time zone column holds IANA names as text or varchar",
                        t.time_zone_column
                    ),
                ));
            }
            // A delete must carry the tenant id: the key is the id, or the whole row.
            if !(info.replica_full || info.key == [t.id_column.clone()]) {
                return Err(err(
                    "tenants.source".into(),
                    format!(
                        "table {} needs {:?} as its primary key or REPLICA IDENTITY FULL so deleted rows carry the tenant id: run ALTER TABLE {} REPLICA IDENTITY FULL",
                        t.source,
                        t.id_column,
                        t.source.quoted()
                    ),
                ));
            }
        }
        if let Some(u) = &self.users {
            let info = lookup("users.source".into(), &u.source)?;
            need_col("users.id_column".into(), info, &u.source, &u.id_column)?;
            need_col("users.tenant_column".into(), info, &u.source, &u.tenant_column)?;
            let (entry, col, fits): (&str, &str, &[&str]) = match &u.roles {
                RolesColumn::List(c) => ("users.roles_column", c, &["json", "jsonb", "_text", "_varchar"]),
                RolesColumn::Single(c) => ("users.role_column", c, &["text", "varchar", "bpchar"]),
            };
            need_col(entry.into(), info, &u.source, col)?;
            let ty = &info.types[col];
            if !fits.contains(&ty.as_str()) {
                return Err(err(
                    entry.into(),
                    format!("{col:?} is {ty}; {entry} needs one of {}", fits.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// The schema entries whose table the publication does not carry (their changes
    /// would never arrive), as (entry, table); `None` when the publication does not
    /// exist yet (pulsed creates it with the tables of `replication.tables`, or every
    /// table of `replication.schema`).
    pub async fn unpublished(
        &self,
        db: &tokio_postgres::Client,
        publication: &str,
    ) -> Result<Option<Vec<(String, TableName)>>, tokio_postgres::Error> {
        if db
            .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
            .await?
            .is_none()
        {
            return Ok(None);
        }
        let published: Vec<TableName> = db
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                &[&publication],
            )
            .await?
            .iter()
            .map(|r| TableName {
                schema: r.get(0),
                table: r.get(1),
            })
            .collect();
        let entries = self
            .tables
            .iter()
            .map(|(n, t)| (format!("tables.{n}.source"), t.source.clone()))
            .chain(
                self.metrics
                    .iter()
                    .map(|(n, m)| (format!("metrics.{n}.source"), m.source.clone())),
            )
            .chain(
                self.notifications
                    .iter()
                    .map(|n| ("notifications.source".to_string(), n.source.clone())),
            )
            .chain(
                self.tenants
                    .iter()
                    .map(|t| ("tenants.source".to_string(), t.source.clone())),
            );
        Ok(Some(entries.filter(|(_, t)| !published.contains(t)).collect()))
    }

    /// The columns of a metric's table the engine needs to evaluate it.
    pub fn metric_columns(m: &Metric) -> Vec<String> {
        let mut cols = vec![m.tenant_column.clone()];
        match &m.aggregate {
            Aggregate::Count => {}
            Aggregate::Sum(c) | Aggregate::CountDistinct(c) => cols.push(c.clone()),
        }
        if let Some((_, c)) = &m.window {
            cols.push(c.clone());
        }
        if let Some(f) = &m.filter {
            f.columns(&mut cols);
        }
        cols.sort();
        cols.dedup();
        cols
    }
}

struct TableInfo {
    types: HashMap<String, String>,
    key: Vec<String>,
    replica_full: bool,
}

async fn table_info(
    db: &tokio_postgres::Client,
    t: &TableName,
) -> Result<Option<TableInfo>, tokio_postgres::Error> {
    let rel = db
        .query_opt(
            "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&t.schema, &t.table],
        )
        .await?;
    let Some(rel) = rel else { return Ok(None) };
    let oid: u32 = rel.get(0);
    let ident: String = rel.get(1);
    // Domains resolve to their base type, as the stream decodes them.
    let cols = db
        .query(
            "SELECT a.attname::text, COALESCE(bt.typname, ty.typname)::text \
             FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid \
             LEFT JOIN pg_type bt ON ty.typtype = 'd' AND bt.oid = ty.typbasetype \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid],
        )
        .await?;
    let key = db
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
            &[&oid],
        )
        .await?;
    Ok(Some(TableInfo {
        types: cols.iter().map(|r| (r.get(0), r.get(1))).collect(),
        key: key.iter().map(|r| r.get(0)).collect(),
        replica_full: ident == "f",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
default_time_zone = "Europe/Paris"
[time_zones]
t2 = "America/New_York"
[roles]
ROLE_SUPER_ADMIN = "platform_admin"
ROLE_ADMIN = "tenant_admin"
ROLE_USER = "member"
[tables.members]
source = "public.members"
tenant_column = "tenant_id"
owner_column = "user_id"
columns = ["id", "name", "status"]
roles = ["tenant_admin", "member"]
filters = ["status"]
[metrics.active]
source = "public.members"
tenant_column = "tenant_id"
aggregate = "count"
filter = "status = 'active'"
window = "last_7_days"
time_column = "created_at"
[notifications]
source = "public.alerts"
[mutations.invite]
args = { email = "text", days = "int?" }
"#;

    #[test]
    fn a_good_file_parses() {
        let s = Schema::parse("s.toml", GOOD).unwrap();
        assert_eq!(s.tables["members"].roles, vec![Role::TenantAdmin, Role::Member]);
        assert_eq!(
            s.metrics["active"].window.as_ref().unwrap().0,
            Window::LastDays(7)
        );
        assert_eq!(s.time_zone("t2"), chrono_tz::America::New_York);
        assert_eq!(s.time_zone("t1"), chrono_tz::Europe::Paris);
        assert_eq!(
            s.map_roles(["ROLE_USER", "ROLE_ADMIN", "ROLE_UNKNOWN"]),
            vec![Role::TenantAdmin, Role::Member]
        );
        let m = &s.mutations["invite"];
        assert!(m.validate(&serde_json::json!({"email": "a@b"})).is_ok());
        assert_eq!(
            m.validate(&serde_json::json!({"email": 3})).unwrap_err().0,
            "args.email"
        );
        assert_eq!(
            m.validate(&serde_json::json!({"email": "x", "evil": 1}))
                .unwrap_err()
                .0,
            "args.evil"
        );
    }

    #[test]
    fn errors_name_the_entry() {
        let cases = [
            (GOOD.replace("\"member\"]", "\"wizard\"]"), "tables.members.roles"),
            (GOOD.replace("last_7_days", "fortnight"), "metrics.active.window"),
            (
                GOOD.replace("status = 'active'", "status = "),
                "metrics.active.filter",
            ),
            (
                GOOD.replace("\"int?\"", "\"color\""),
                "mutations.invite.args.days",
            ),
            (GOOD.replace("America/New_York", "Mars/Base"), "time_zones.t2"),
            (
                GOOD.replace("filters = [\"status\"]", "filters = [\"secret\"]"),
                "tables.members.filters",
            ),
        ];
        for (text, entry) in cases {
            let e = Schema::parse("s.toml", &text).unwrap_err();
            assert_eq!(e.entry, entry, "{e}");
        }
        let e = Schema::parse("s.toml", "[tables.x]\nsource = 1\n").unwrap_err();
        assert!(e.entry.starts_with("line"), "{e}");
    }

    #[test]
    fn events_thresholds_users_and_mutation_roles_parse() {
        let text = format!(
            "{GOOD}{}",
            r#"roles = ["tenant_admin"]
class = "App\\Message\\InviteMember"
[metrics.active2]
source = "public.members"
tenant_column = "tenant_id"
aggregate = "count"
thresholds = [100, 500]
above = [1000]
below = [10, 100]
[events]
class_namespace = "Club\\Events"
[events.send]
"presence.joined" = true
"notification.created" = "Club\\Inbox\\Created"
"file.deleted" = false
[users]
source = "public.app_user"
tenant_column = "organisation_id"
roles_column = "roles"
"#
        );
        let s = Schema::parse("s.toml", &text).unwrap();
        let t = &s.metrics["active2"].thresholds;
        let got: Vec<(f64, bool, bool)> = t.iter().map(|t| (t.value, t.up, t.down)).collect();
        assert_eq!(
            got,
            vec![
                (10.0, false, true),
                (100.0, true, true),
                (500.0, true, true),
                (1000.0, true, false)
            ]
        );
        assert_eq!(t[1].crossed(99.0, 100.0), Some("up"));
        assert_eq!(t[1].crossed(100.0, 99.5), Some("down"));
        assert_eq!(t[1].crossed(100.0, 150.0), None);
        assert_eq!(t[3].crossed(1001.0, 2.0), None, "above only");
        let e = &s.events;
        assert!(e.is_enabled("presence.joined"));
        assert!(!e.is_enabled("presence.left"), "not listed");
        assert!(!e.is_enabled("file.deleted"), "listed as false");
        assert!(e.is_enabled("mutation.invite"), "declared mutations are sent");
        assert_eq!(e.class_of("presence.joined"), "Club\\Events\\PresenceJoined");
        assert_eq!(e.class_of("notification.created"), "Club\\Inbox\\Created");
        assert_eq!(e.class_of("mutation.invite"), "App\\Message\\InviteMember");
        let m = &s.mutations["invite"];
        assert_eq!(
            (m.roles.clone(), m.event),
            (vec![Role::TenantAdmin], "mutation.invite")
        );
        let u = s.users.as_ref().unwrap();
        assert_eq!(
            (u.id_column.as_str(), u.tenant_column.as_str(), &u.roles),
            ("id", "organisation_id", &RolesColumn::List("roles".into()))
        );
        // Without [events]: every event, the default namespace.
        let plain = Schema::parse("s.toml", GOOD).unwrap();
        assert!(plain.events.is_enabled("file.deleted"));
        assert_eq!(
            plain.events.class_of("file.deleted"),
            "App\\Message\\Pulse\\FileDeleted"
        );
        assert_eq!(plain.mutations["invite"].roles.len(), 4);
    }

    #[test]
    fn event_and_user_errors_name_the_entry() {
        let cases = [
            (
                "[events.send]\n\"presence.jumped\" = true\n",
                "events.send.\"presence.jumped\"",
            ),
            (
                "[events.send]\n\"presence.joined\" = \"Not A Class\"\n",
                "events.send.\"presence.joined\"",
            ),
            (
                "[events.send]\n\"mutation.invite\" = true\n",
                "events.send.\"mutation.invite\"",
            ),
            (
                "[events]\nclass_namespace = \"9lives\"\n",
                "events.class_namespace",
            ),
            (
                "[users]\nsource = \"public.u\"\nroles_column = \"r\"\nrole_column = \"x\"\n",
                "users.roles_column",
            ),
            ("[mutations.go]\nroles = [\"wizard\"]\n", "mutations.go.roles"),
            ("[mutations.go]\nclass = \"a b\"\n", "mutations.go.class"),
            (
                "[metrics.m]\nsource = \"m\"\ntenant_column = \"t\"\naggregate = \"count\"\nthresholds = [nan]\n",
                "metrics.m.thresholds",
            ),
        ];
        for (text, entry) in cases {
            let e = Schema::parse("s.toml", text).unwrap_err();
            assert_eq!(e.entry, entry, "{e}");
        }
        // An unquoted dotted name is a nested table in TOML: the error names the line.
        let e = Schema::parse("s.toml", "[events.send]\npresence.joined = true\n").unwrap_err();
        assert!(e.entry.starts_with("line"), "{e}");
    }

    #[test]
    fn tenants_parse_and_definitions_fingerprint_what_counts() {
        let text = format!("{GOOD}[tenants]\nsource = \"public.organisation\"\n");
        let s = Schema::parse("s.toml", &text).unwrap();
        let t = s.tenants.as_ref().unwrap();
        assert_eq!(
            (
                t.source.to_string(),
                t.id_column.as_str(),
                t.time_zone_column.as_str()
            ),
            ("public.organisation".to_string(), "id", "timezone")
        );
        let table: HashMap<String, Tz> = [
            ("t1".to_string(), chrono_tz::Asia::Tokyo),
            ("t2".to_string(), chrono_tz::Asia::Tokyo),
        ]
        .into_iter()
        .collect();
        // The file pins t2; t1 comes from the table; others get the default.
        assert_eq!(s.zone("t1", &table), chrono_tz::Asia::Tokyo);
        assert_eq!(s.zone("t2", &table), chrono_tz::America::New_York);
        assert_eq!(s.zone("t3", &table), chrono_tz::Europe::Paris);
        assert_eq!(s.parse_zone("t1", Some("Mars/Base"), true), None);
        assert_eq!(
            s.parse_zone("t1", Some("Asia/Tokyo"), true),
            Some(chrono_tz::Asia::Tokyo)
        );
        let e = Schema::parse("s.toml", "[tenants]\nsource = \"a b\"\n").unwrap_err();
        assert_eq!(e.entry, "tenants.source");

        let plain = Schema::parse("s.toml", GOOD).unwrap();
        let m = &plain.metrics["active"];
        let spaced = Schema::parse(
            "s.toml",
            &GOOD.replace("status = 'active'", "status  =  'active'"),
        )
        .unwrap();
        assert_eq!(
            plain.fingerprint(m),
            spaced.fingerprint(&spaced.metrics["active"])
        );
        for changed in [
            GOOD.replace("status = 'active'", "status = 'gone'"),
            GOOD.replace("last_7_days", "today"),
            GOOD.replace("Europe/Paris", "Europe/Berlin"),
            text.clone(),
        ] {
            let other = Schema::parse("s.toml", &changed).unwrap();
            assert_ne!(
                plain.fingerprint(m),
                other.fingerprint(&other.metrics["active"]),
                "{changed}"
            );
        }
    }

    #[test]
    fn windows_start_where_expected() {
        let d = chrono::NaiveDate::from_ymd_opt(2026, 11, 26).unwrap(); // a Thursday
        assert_eq!(Window::Today.start(d), d);
        assert_eq!(Window::ThisWeek.start(d).to_string(), "2026-11-23");
        assert_eq!(Window::ThisMonth.start(d).to_string(), "2026-11-01");
        assert_eq!(Window::LastDays(7).start(d).to_string(), "2026-11-20");
    }
}
