-- Consumer-side idempotency (src/idempotency.rs): one row per event a
-- consumer group has applied. Delivery to Kafka is at least once, so a
-- consumer may see an event again; it inserts the marker in the same
-- transaction as the event's effects, and a second delivery finds the row
-- (primary key conflict) and is skipped. The key is per group: two groups
-- reading the same topic each apply every event once.
CREATE TABLE IF NOT EXISTS {{schema}}.processed_events (
  tracking_id     uuid        NOT NULL,  -- the event's `tracking_id` header
  consumer_group  text        NOT NULL,  -- who applied it
  processed_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tracking_id, consumer_group)
);

-- Retention: markers only need to outlive the longest redelivery window
-- (Kafka retention plus the longest a consumer may lag), so old ones can be
-- deleted in processed_at order, e.g.
--   DELETE FROM processed_events WHERE processed_at < now() - interval '30 days';
CREATE INDEX IF NOT EXISTS processed_events_processed_at_idx
  ON {{schema}}.processed_events (processed_at);
