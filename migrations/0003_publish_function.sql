-- One call to publish an event from any language, inside the caller's own
-- transaction. Returns the event's tracking_id.
CREATE OR REPLACE FUNCTION {{schema}}.outbox_publish(
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
