-- Dead-letter governance: the audit trail of `pgoutbox dle redrive` and
-- `pgoutbox dle skip`. One row per operator action, written in the same
-- transaction as the status change it records. Shared by every outbox table
-- of the schema (table_name says which one). See docs/dead-letters.md.
CREATE TABLE IF NOT EXISTS {{schema}}.pgoutbox_dead_letter_actions (
  id            bigserial PRIMARY KEY,
  action        text NOT NULL CHECK (action IN ('redrive', 'skip')),
  table_name    text NOT NULL,
  performed_by  text NOT NULL DEFAULT current_user,
  performed_at  timestamptz NOT NULL DEFAULT now(),
  reason        text NOT NULL CHECK (btrim(reason) <> ''),
  tracking_ids  uuid[] NOT NULL,
  row_count     int NOT NULL
);

COMMENT ON TABLE {{schema}}.pgoutbox_dead_letter_actions IS
  'pgoutbox: who redrove or skipped which dead-lettered outbox rows, when and why';
