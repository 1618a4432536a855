-- What the persisted metric cells were computed with, so that a metric whose definition
-- changed in the schema file (or a new one) is recomputed at start, and recomputations
-- that run ahead of the checkpoint.

-- The definition each metric's cells follow: its fingerprint (SHA-256 of the fields
-- that change its cells) and those fields, to log what changed.
CREATE TABLE pulse.metric_definitions (
    metric      text PRIMARY KEY,
    fingerprint text NOT NULL,
    definition  jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Recomputations of a metric, for every tenant (tenant = '') or one. valid_from: the
-- cells were recomputed from a snapshot holding every transaction that ended at or
-- before it, so the stream (which resumes from the older checkpoint) skips those for
-- these cells only; a row is deleted once the checkpoint passes it. valid_from NULL:
-- wanted and not done yet (a tenant's time zone changed), done at the next start if
-- pulsed stops first.
CREATE TABLE pulse.metric_refreshes (
    metric      text NOT NULL,
    tenant      text NOT NULL,
    valid_from  pg_lsn,
    reason      text NOT NULL,
    PRIMARY KEY (metric, tenant)
);

-- Tenant time zones from the schema file's [tenants] table, as the change stream has
-- brought them up to the checkpoint (written in the same transaction). Only valid IANA
-- names; a tenant without a row has the default zone.
CREATE TABLE pulse.tenant_zones (
    tenant  text PRIMARY KEY,
    zone    text NOT NULL
);

-- The [tenants] entry the zones were loaded for (source, id and zone columns), and the
-- snapshot LSN they were loaded at: tenants-table changes ending at or before it are
-- already in pulse.tenant_zones.
CREATE TABLE pulse.tenant_zone_source (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    definition  text NOT NULL,
    valid_from  pg_lsn NOT NULL
);
