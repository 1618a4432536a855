-- A MemberPulse-like Symfony schema: organisations (tenants), members, events,
-- registrations, payments, and Symfony's own notifications table. Doctrine would
-- create these; the demo creates them by hand.
CREATE TABLE organisation (
    id          serial PRIMARY KEY,
    slug        text NOT NULL UNIQUE,
    name        text NOT NULL,
    timezone    text NOT NULL DEFAULT 'Europe/Paris',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE member (
    id              serial PRIMARY KEY,
    organisation_id integer NOT NULL REFERENCES organisation(id),
    email           text NOT NULL,
    full_name       text NOT NULL,
    roles           jsonb NOT NULL DEFAULT '["ROLE_MEMBER"]',
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('pending', 'active', 'lapsed')),
    joined_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organisation_id, email)
);

CREATE TABLE event (
    id              serial PRIMARY KEY,
    organisation_id integer NOT NULL REFERENCES organisation(id),
    title           text NOT NULL,
    starts_at       timestamptz NOT NULL,
    capacity        integer NOT NULL DEFAULT 50
);

CREATE TABLE registration (
    id              serial PRIMARY KEY,
    organisation_id integer NOT NULL REFERENCES organisation(id),
    event_id        integer NOT NULL REFERENCES event(id),
    member_id       integer NOT NULL REFERENCES member(id),
    status          text NOT NULL DEFAULT 'confirmed',
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE payment (
    id              serial PRIMARY KEY,
    organisation_id integer NOT NULL REFERENCES organisation(id),
    member_id       integer NOT NULL REFERENCES member(id),
    amount          numeric(10, 2) NOT NULL,
    currency        char(3) NOT NULL DEFAULT 'EUR',
    status          text NOT NULL DEFAULT 'paid' CHECK (status IN ('pending', 'paid', 'refunded')),
    paid_at         timestamptz NOT NULL DEFAULT now()
);

-- Symfony writes rows here to notify a member; Pulse delivers them live.
CREATE TABLE app_notification (
    id              serial PRIMARY KEY,
    organisation_id integer NOT NULL REFERENCES organisation(id),
    member_id       integer NOT NULL REFERENCES member(id),
    title           text NOT NULL,
    body            text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Pulse sees the old row of every update and delete (rows leaving a filter or a
-- tenant, metrics moving down): live tables and metric tables need the full row.
ALTER TABLE member REPLICA IDENTITY FULL;
ALTER TABLE payment REPLICA IDENTITY FULL;
ALTER TABLE registration REPLICA IDENTITY FULL;
