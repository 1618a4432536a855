-- Webhooks to Symfony (outbox and its dead letters), commands from Symfony (processed
-- command ids) and scheduled jobs (run records).

-- The transactional outbox: a row is written in the same transaction as the state change
-- it reports, and the relay publishes it afterwards. message_id is the idempotency key
-- (the AMQP message_id); UNIQUE so that a replayed change enqueues nothing new.
-- Rows stay after delivery (delivered_at set) until the prune_outbox job removes them.
CREATE TABLE pulse.outbox (
    id              bigserial PRIMARY KEY,
    message_id      text NOT NULL UNIQUE,
    -- Events of one aggregate (for example one user) are published in id order.
    aggregate       text NOT NULL,
    -- The event name, also the routing key: presence.joined, notification.created...
    -- The PHP class (AMQP header `type`) is derived from it when publishing.
    event           text NOT NULL,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Failed publish attempts (returned or nacked by the broker); a broker outage does
    -- not count.
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    delivered_at    timestamptz
);
CREATE INDEX outbox_pending ON pulse.outbox (id) WHERE delivered_at IS NULL;
-- Rows waiting for a retry hold back later events of their aggregate; few at any time.
CREATE INDEX outbox_retrying ON pulse.outbox (aggregate, id) WHERE delivered_at IS NULL AND attempts > 0;
CREATE INDEX outbox_delivered ON pulse.outbox (delivered_at) WHERE delivered_at IS NOT NULL;

-- Events that failed amqp.max_attempts times. The console shows them and can requeue
-- one (it goes back into the outbox with its message_id).
CREATE TABLE pulse.outbox_dead (
    id              bigint PRIMARY KEY,
    message_id      text NOT NULL,
    aggregate       text NOT NULL,
    event           text NOT NULL,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL,
    attempts        integer NOT NULL,
    last_error      text NOT NULL,
    dead_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_dead_at ON pulse.outbox_dead (dead_at);

-- Commands from Symfony already carried out, by their id: a redelivered command is
-- acknowledged without being applied twice. Written in the transaction of the effect.
CREATE TABLE pulse.processed_commands (
    command_id      text PRIMARY KEY,
    kind            text NOT NULL,
    outcome         text NOT NULL,
    detail          jsonb NOT NULL DEFAULT '{}'::jsonb,
    processed_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX processed_commands_at ON pulse.processed_commands (processed_at);

-- One row per job run: scheduled or run by hand from the console.
CREATE TABLE pulse.job_runs (
    id              bigserial PRIMARY KEY,
    job             text NOT NULL,
    trigger         text NOT NULL CHECK (trigger IN ('schedule', 'manual')),
    -- Who: the instance (host:pid) for scheduled runs, the actor for manual ones.
    started_by      text NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at        timestamptz,
    outcome         text NOT NULL DEFAULT 'running'
                    CHECK (outcome IN ('running', 'ok', 'failed', 'timeout')),
    counts          jsonb NOT NULL DEFAULT '{}'::jsonb,
    error           text
);
CREATE INDEX job_runs_job ON pulse.job_runs (job, started_at DESC);
