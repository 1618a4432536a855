-- An upload is recorded (blob, file, event, its ticket marked settled) without its
-- tenant's usage row, so the uploads of one tenant commit side by side and share WAL
-- flushes; its bytes move into storage_usage right after, in a short transaction of
-- their own under the usage row (the "fold"). Between the two, the ticket still holds
-- its reservation (counted against the quota: never less than the bytes it stored) and
-- pending_bytes says what the fold adds to used_bytes (0 when the content was already
-- stored). A fold lost in a crash is done by the next start or cleanup run.
ALTER TABLE pulse.upload_tickets ADD COLUMN pending_bytes bigint NOT NULL DEFAULT 0
    CHECK (pending_bytes >= 0);

-- Settled tickets not folded yet: a handful at any time, found by tenant.
CREATE INDEX upload_tickets_unfolded ON pulse.upload_tickets (tenant)
    WHERE file_id IS NOT NULL AND (reserved_bytes > 0 OR pending_bytes > 0);
