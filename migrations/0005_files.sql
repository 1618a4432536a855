-- File storage: upload tickets, stored content (blobs) and the files that name them,
-- with per-tenant usage kept beside so quota checks are one row lock.

-- Content stored once per tenant, addressed by the SHA-256 of its plaintext.
CREATE TABLE pulse.file_blobs (
    tenant       text NOT NULL,
    sha256       text NOT NULL,
    size         bigint NOT NULL,
    -- Where the bytes are in the object store (content address under the tenant).
    storage_key  text NOT NULL,
    -- Id of the encryption key the object was written with; NULL when stored in clear.
    key_id       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, sha256)
);

-- A file as users see it: a name, a type, an owner, a visibility, pointing at a blob.
CREATE TABLE pulse.files (
    id            uuid PRIMARY KEY,
    tenant        text NOT NULL,
    owner         text,
    name          text NOT NULL,
    content_type  text NOT NULL,
    size          bigint NOT NULL,
    sha256        text NOT NULL,
    public        boolean NOT NULL DEFAULT false,
    -- The Symfony row this file belongs to (schema-qualified table and id as text);
    -- the cleanup removes files whose row is gone.
    attached_table text,
    attached_id    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant, sha256) REFERENCES pulse.file_blobs (tenant, sha256)
);
CREATE INDEX files_blob ON pulse.files (tenant, sha256);
CREATE INDEX files_owner ON pulse.files (tenant, owner);

-- Single-use upload tickets. used_at is set when an upload starts; a ticket that was
-- used or has expired is refused.
CREATE TABLE pulse.upload_tickets (
    id             uuid PRIMARY KEY,
    tenant         text NOT NULL,
    owner          text,
    name           text NOT NULL,
    max_bytes      bigint NOT NULL,
    content_types  text[] NOT NULL,
    public         boolean NOT NULL DEFAULT false,
    attached_table text,
    attached_id    text,
    expires_at     timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    used_at        timestamptz,
    -- Bytes reserved against the quota while the upload runs; 0 once settled.
    reserved_bytes bigint NOT NULL DEFAULT 0,
    file_id        uuid
);
CREATE INDEX upload_tickets_expiry ON pulse.upload_tickets (expires_at);

-- Bytes stored (blobs) and bytes reserved by running uploads, per tenant.
CREATE TABLE pulse.storage_usage (
    tenant         text PRIMARY KEY,
    used_bytes     bigint NOT NULL DEFAULT 0 CHECK (used_bytes >= 0),
    reserved_bytes bigint NOT NULL DEFAULT 0 CHECK (reserved_bytes >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
