-- The pulse schema: Pulse's own state, beside (never inside) Symfony's tables.
-- The schema itself and pulse.schema_migrations are created by the runner.

-- Platform settings of the product page, edited from pulsetop; config values are the
-- defaults until a row exists here.
CREATE TABLE pulse.settings (
    key         text PRIMARY KEY,
    value       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text NOT NULL
);

-- Every change made by a person or a service through Pulse: settings edits, jobs run by
-- hand, erasures. Secrets are never written here in clear.
CREATE TABLE pulse.audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL DEFAULT '',
    details     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at ON pulse.audit_log (at);

-- Derived-state checkpoints: the LSN up to which everything Pulse derived from the
-- change stream is durable. The replication slot is never confirmed beyond it.
CREATE TABLE pulse.checkpoints (
    name        text PRIMARY KEY,
    lsn         pg_lsn NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
