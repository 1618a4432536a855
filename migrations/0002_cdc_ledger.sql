-- The change ledger: with replication.sink = ledger, every change pulsed applies from
-- the stream (and every row of the initial snapshot) is recorded here, in the same
-- transaction as the checkpoint. Keyed by source position, so a change applied twice
-- is a key violation rather than a silent duplicate. A diagnostic and test consumer.
CREATE TABLE pulse.cdc_ledger (
    slot        text NOT NULL,
    commit_lsn  pg_lsn NOT NULL,
    seq         integer NOT NULL,
    xid         bigint NOT NULL,
    relation    text NOT NULL,
    kind        text NOT NULL,
    key         text,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, commit_lsn, seq)
);
