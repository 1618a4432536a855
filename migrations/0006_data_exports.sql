-- GDPR exports of a user's realtime data (ExportUserData commands from Symfony). The
-- row is written in the command's transaction together with the data_export.ready event
-- that announces it; an EraseUserData command for the same user deletes it.
CREATE TABLE pulse.data_exports (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    command_id  text NOT NULL UNIQUE,
    tenant      text NOT NULL,
    user_id     text NOT NULL,
    data        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX data_exports_user ON pulse.data_exports (tenant, user_id);
