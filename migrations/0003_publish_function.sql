-- One call to publish an event from any language, inside the caller's own
-- transaction. Returns the event's tracking_id. Named outbox_publish for the
-- table "outbox", <table>_publish for other outbox tables.
CREATE OR REPLACE FUNCTION {{schema}}.{{publish_function}}(
  aggregate_type text,
  aggregate_id uuid,
  event_type text,
  payload jsonb,
  metadata jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE sql VOLATILE AS $fn$
  INSERT INTO {{schema}}.{{table}} (aggregate_type, aggregate_id, event_type, payload, metadata)
  VALUES ($1, $2, $3, $4, coalesce($5, '{}'::jsonb))
  RETURNING tracking_id
$fn$;
