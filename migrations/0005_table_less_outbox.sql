-- The table-less outbox: outbox_emit writes an event as a transactional
-- logical message instead of a row (same signature as outbox_publish, returns
-- the tracking_id). Nothing is stored in a table; the relay reads it from the
-- WAL. Messages that can never be published are recorded in
-- pgoutbox_dead_letters with their LSN.
CREATE OR REPLACE FUNCTION {{schema}}.outbox_emit(
  aggregate_type text,
  aggregate_id uuid,
  event_type text,
  payload jsonb,
  metadata jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  tid uuid := gen_random_uuid();
BEGIN
  PERFORM pg_logical_emit_message(
    true,
    {{message_prefix_literal}},
    jsonb_build_object(
      'tracking_id', tid,
      'aggregate_type', $1,
      'aggregate_id', $2,
      'event_type', $3,
      'payload', $4,
      'metadata', coalesce($5, '{}'::jsonb),
      'created_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'
    )::text);
  RETURN tid;
END
$fn$;

CREATE TABLE IF NOT EXISTS {{schema}}.pgoutbox_dead_letters (
  id          bigserial PRIMARY KEY,
  lsn         pg_lsn,
  prefix      text,
  content     bytea,
  error       text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now()
);
