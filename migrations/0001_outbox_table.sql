-- The outbox table of the seed framework, partitioned by created_at from day 0.
-- Placeholders (see src/outbox/migrate.rs): schema, table, pending_index as quoted identifiers; *_literal as string literals.
CREATE SCHEMA IF NOT EXISTS {{schema}};

CREATE TABLE IF NOT EXISTS {{schema}}.{{table}} (
  id              BIGSERIAL,
  tracking_id     UUID NOT NULL DEFAULT gen_random_uuid(),
  aggregate_id    UUID NOT NULL,
  aggregate_type  TEXT NOT NULL,
  event_type      TEXT NOT NULL,
  payload         JSONB NOT NULL,
  metadata        JSONB NOT NULL DEFAULT '{}',
  status          TEXT NOT NULL DEFAULT 'PENDING'
                  CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED', 'DEAD_LETTER')),
  retry_count     INT NOT NULL DEFAULT 0,
  max_retries     INT NOT NULL DEFAULT 5,
  created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
  processed_at    TIMESTAMPTZ,
  locked_until    TIMESTAMPTZ,
  lock_token      BIGINT,
  last_error      TEXT,
  PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);

-- Pending rows, oldest first: what pollers claim and what the CDC backfill reads.
CREATE INDEX IF NOT EXISTS {{pending_index}}
  ON {{schema}}.{{table}} (created_at, id) WHERE status = 'PENDING';

-- Creates monthly partitions named <table>_YYYY_MM from the current month up
-- to months_ahead months ahead. Idempotent; returns how many it created.
CREATE OR REPLACE FUNCTION {{schema}}.pgoutbox_ensure_partitions(parent regclass, months_ahead int DEFAULT 2)
RETURNS int LANGUAGE plpgsql AS $fn$
DECLARE
  start_month date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
  m date;
  part_name text;
  parent_schema text;
  parent_name text;
  created int := 0;
BEGIN
  SELECT n.nspname, c.relname INTO parent_schema, parent_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = parent;
  FOR i IN 0..months_ahead LOOP
    m := (start_month + make_interval(months => i))::date;
    part_name := parent_name || '_' || to_char(m, 'YYYY_MM');
    IF to_regclass(format('%I.%I', parent_schema, part_name)) IS NULL THEN
      EXECUTE format(
        'CREATE TABLE %I.%I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
        parent_schema, part_name, parent,
        m::timestamp AT TIME ZONE 'UTC',
        (m + interval '1 month')::timestamp AT TIME ZONE 'UTC');
      created := created + 1;
    END IF;
  END LOOP;
  RETURN created;
END
$fn$;

SELECT {{schema}}.pgoutbox_ensure_partitions('{{schema}}.{{table}}'::regclass, 1);
