-- The audit trail of `pgoutbox replay`: one row per replay (dry runs are not
-- recorded), inserted before the first event is sent (its id is the value of
-- the `pgoutbox_replay` header on every replayed record) and completed when
-- the replay ends. A row left 'running' is a replay that was killed. Shared by
-- every outbox table of the schema (table_name says which one). See
-- docs/replay.md.
CREATE TABLE IF NOT EXISTS {{schema}}.pgoutbox_replays (
  id            bigserial PRIMARY KEY,
  table_name    text NOT NULL,
  performed_by  text NOT NULL DEFAULT current_user,
  started_at    timestamptz NOT NULL DEFAULT now(),
  finished_at   timestamptz,
  reason        text NOT NULL CHECK (btrim(reason) <> ''),
  selection     jsonb NOT NULL,
  target_topic  text,
  rate_limit    double precision,
  selected      bigint NOT NULL,
  sent          bigint NOT NULL DEFAULT 0,
  refused       bigint NOT NULL DEFAULT 0,
  outcome       text NOT NULL DEFAULT 'running'
                CHECK (outcome IN ('running', 'completed', 'failed', 'interrupted')),
  error         text
);

COMMENT ON TABLE {{schema}}.pgoutbox_replays IS
  'pgoutbox: who re-published which outbox events to Kafka (pgoutbox replay), when, why, and how it ended';
