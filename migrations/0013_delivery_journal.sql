-- The delivery journal (ARCHITECTURE.md, invariant 14): in CDC mode the
-- relay records what Kafka acknowledged as one row per batch of outbox rows
-- (their ids and created_at as arrays) instead of updating every row to
-- COMPLETED on the stream's critical path: an insert of a few bytes a row
-- where the update wrote a whole new tuple, index entries and ~1 kB of WAL a
-- row (BENCHMARKS.md, "Ways of recording a delivery"). A row is delivered
-- when it is COMPLETED or listed here. The relay folds entries into the
-- rows (COMPLETED, processed_at = delivered_at) when it has room, before
-- polling, before a backfill and before retention, and deletes them as it
-- does. `outbox` is the outbox table's name in this schema.
CREATE TABLE IF NOT EXISTS {{schema}}.pgoutbox_delivered (
  seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  outbox       text          NOT NULL,
  ids          bigint[]      NOT NULL,
  created_ats  timestamptz[] NOT NULL,
  delivered_at timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS pgoutbox_delivered_outbox_idx
  ON {{schema}}.pgoutbox_delivered (outbox, seq);
