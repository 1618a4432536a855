-- The realtime engine's state: notifications and the cells of live dashboard metrics.

-- Notifications: created by a mutation (by those allowed to send) or from the configured
-- Symfony table through the change stream. `source_key` makes a replayed change a no-op.
CREATE TABLE pulse.notifications (
    id          bigserial PRIMARY KEY,
    tenant      text NOT NULL,
    user_id     text NOT NULL,
    title       text NOT NULL,
    body        text NOT NULL DEFAULT '',
    data        jsonb NOT NULL DEFAULT '{}'::jsonb,
    source_key  text UNIQUE,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    read_at     timestamptz
);
CREATE INDEX notifications_inbox ON pulse.notifications (tenant, user_id, id DESC);
CREATE INDEX notifications_unread ON pulse.notifications (tenant, user_id) WHERE read_at IS NULL;
CREATE INDEX notifications_created ON pulse.notifications (created_at);

-- Live metric cells, valid at the engine's checkpoint LSN (written in the same
-- transaction as the checkpoint). bucket: local date for windowed metrics, else ''.
-- dkey: the distinct value for count-distinct, else ''. Sums in millionths.
CREATE TABLE pulse.metric_cells (
    metric      text NOT NULL,
    tenant      text NOT NULL,
    bucket      text NOT NULL,
    dkey        text NOT NULL,
    n           bigint NOT NULL,
    micros      bigint NOT NULL,
    PRIMARY KEY (metric, tenant, bucket, dkey)
);
