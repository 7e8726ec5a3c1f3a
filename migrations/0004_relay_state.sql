-- What the relay knows about the slots it created. A slot recorded here that
-- has disappeared was lost (dropped or invalidated): the relay stops instead
-- of recreating it, because a new slot would silently skip events.
CREATE TABLE IF NOT EXISTS {{schema}}.pgoutbox_slot_state (
  slot_name         text PRIMARY KEY,
  created_at        timestamptz NOT NULL DEFAULT now(),
  consistent_point  pg_lsn,
  backfill_done_at  timestamptz
);
