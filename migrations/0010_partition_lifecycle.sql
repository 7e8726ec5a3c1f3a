-- Partition lifecycle (docs/partitioning.md): monthly or daily partitions
-- created ahead, by `pgoutbox partitions maintain` (an administrator, with a
-- clock it may fake) and by the relay (the least-privilege role, with the
-- server's clock only).
--
-- pgoutbox_partition_bounds(parent) lists the partitions of an outbox table
-- with their ranges (NULL bounds for a DEFAULT partition; -infinity /
-- infinity for MINVALUE / MAXVALUE).
CREATE OR REPLACE FUNCTION {{schema}}.pgoutbox_partition_bounds(parent regclass)
RETURNS TABLE (partition regclass, range_start timestamptz, range_end timestamptz, is_default boolean)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
  SELECT c.oid::regclass,
         CASE WHEN m IS NULL THEN NULL
              WHEN m[1] = 'MINVALUE' THEN '-infinity'::timestamptz
              ELSE btrim(m[1], '''')::timestamptz END,
         CASE WHEN m IS NULL THEN NULL
              WHEN m[2] = 'MAXVALUE' THEN 'infinity'::timestamptz
              ELSE btrim(m[2], '''')::timestamptz END,
         pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                    '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') AS m
   WHERE i.inhparent = parent
   ORDER BY 2 NULLS LAST
$fn$;

-- pgoutbox_create_partitions(parent, ahead, step, at) creates the partitions
-- of the period holding `at` and the `ahead` periods after it ('monthly':
-- <table>_YYYY_MM over [month, next month); 'daily': <table>_YYYY_MM_DD over
-- [day, next day); UTC). A period that an existing partition already covers
-- is skipped; one it covers in part is created from the end of the last
-- existing range that overlaps it (<table>_YYYY_MM_DD, named after its
-- start). So switching from monthly to daily creates daily partitions only
-- after the last monthly range, and back again, and no range ever overlaps.
-- Returns what it created. SECURITY DEFINER (partitions belong to the
-- table's owner, whoever runs maintain); EXECUTE is not granted to the
-- relay: only pgoutbox_ensure_partitions, which passes the server's now().
CREATE OR REPLACE FUNCTION {{schema}}.pgoutbox_create_partitions(parent regclass, ahead int, step text, at timestamptz)
RETURNS TABLE (partition_name text, range_start timestamptz, range_end timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  parent_schema text;
  parent_name text;
  unit interval;
  period_start timestamp;
  lo timestamptz;
  hi timestamptz;
  covered_to timestamptz;
  part_name text;
BEGIN
  SELECT n.nspname, c.relname INTO parent_schema, parent_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE c.oid = parent AND c.relkind = 'p';
  IF parent_schema IS DISTINCT FROM {{schema_literal}} OR NOT EXISTS (
       SELECT 1 FROM public.pgoutbox_migrations WHERE target = parent_schema || '.' || parent_name
     ) THEN
    RAISE EXCEPTION 'pgoutbox_create_partitions: % is not a partitioned outbox table migrated by pgoutbox in schema %',
      parent, {{schema_literal}}
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF step = 'monthly' THEN
    unit := interval '1 month';
    IF ahead IS NULL OR ahead < 0 OR ahead > 24 THEN
      RAISE EXCEPTION 'pgoutbox_create_partitions: monthly ahead must be 0..24, not %', ahead
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  ELSIF step = 'daily' THEN
    unit := interval '1 day';
    IF ahead IS NULL OR ahead < 0 OR ahead > 366 THEN
      RAISE EXCEPTION 'pgoutbox_create_partitions: daily ahead must be 0..366, not %', ahead
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  ELSE
    RAISE EXCEPTION 'pgoutbox_create_partitions: step must be ''monthly'' or ''daily'', not %', step
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF at IS NULL OR NOT isfinite(at) THEN
    RAISE EXCEPTION 'pgoutbox_create_partitions: at must be a finite timestamp'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- One creator per table at a time (relays, standbys and maintain may run
  -- together); a key of its own, apart from the two-key serving lock.
  PERFORM pg_advisory_xact_lock(hashtextextended('pgoutbox_partitions ' || parent_schema || '.' || parent_name, 0));
  period_start := date_trunc(CASE step WHEN 'monthly' THEN 'month' ELSE 'day' END, at AT TIME ZONE 'UTC');
  FOR i IN 0..ahead LOOP
    lo := (period_start + i * unit) AT TIME ZONE 'UTC';
    hi := (period_start + (i + 1) * unit) AT TIME ZONE 'UTC';
    SELECT max(b.range_end) INTO covered_to
      FROM {{schema}}.pgoutbox_partition_bounds(parent) b
     WHERE NOT b.is_default AND b.range_start < hi AND b.range_end > lo;
    IF covered_to IS NOT NULL THEN
      IF covered_to >= hi THEN
        CONTINUE;
      END IF;
      lo := covered_to;
    END IF;
    IF lo = (period_start + i * unit) AT TIME ZONE 'UTC' THEN
      part_name := parent_name || '_' || to_char(lo AT TIME ZONE 'UTC',
                     CASE step WHEN 'monthly' THEN 'YYYY_MM' ELSE 'YYYY_MM_DD' END);
    ELSE
      part_name := parent_name || '_' || to_char(lo AT TIME ZONE 'UTC', 'YYYY_MM_DD');
    END IF;
    EXECUTE format(
      'CREATE TABLE %I.%I PARTITION OF %I.%I FOR VALUES FROM (%L) TO (%L)',
      parent_schema, part_name, parent_schema, parent_name, lo, hi);
    partition_name := part_name;
    range_start := lo;
    range_end := hi;
    RETURN NEXT;
  END LOOP;
END
$fn$;

REVOKE ALL ON FUNCTION {{schema}}.pgoutbox_create_partitions(regclass, int, text, timestamptz) FROM PUBLIC;

-- What the relay calls, at start and every partitions.maintain_interval_s:
-- partitions ahead in the configured interval, on the server's clock.
-- Creating a partition takes an ACCESS EXCLUSIVE lock on the outbox for an
-- instant; behind a long transaction it would make the application's
-- inserts queue, so the relay gives up after 2 s and tries again at its
-- next run (there is a whole period of partitions ahead to spare).
CREATE OR REPLACE FUNCTION {{schema}}.pgoutbox_ensure_partitions(parent regclass, ahead int, step text)
RETURNS int LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '2s'
AS $fn$
BEGIN
  RETURN (SELECT count(*) FROM {{schema}}.pgoutbox_create_partitions(parent, ahead, step, now()))::int;
END
$fn$;

REVOKE ALL ON FUNCTION {{schema}}.pgoutbox_ensure_partitions(regclass, int, text) FROM PUBLIC;

-- The two-argument form of migration 9 keeps its signature, privileges and
-- meaning (monthly), on the same code.
CREATE OR REPLACE FUNCTION {{schema}}.pgoutbox_ensure_partitions(parent regclass, months_ahead int DEFAULT 2)
RETURNS int LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
  RETURN (SELECT count(*) FROM {{schema}}.pgoutbox_create_partitions(parent, months_ahead, 'monthly', now()))::int;
END
$fn$;

-- Whoever may call the two-argument form (the relay roles granted by
-- `migrate --relay-role`) may call the new one.
DO $do$
DECLARE
  r record;
BEGIN
  FOR r IN
    SELECT pg_get_userbyid(a.grantee) AS grantee
      FROM pg_proc p, aclexplode(p.proacl) a
     WHERE p.oid = '{{schema}}.pgoutbox_ensure_partitions(regclass, int)'::regprocedure
       AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
  LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION {{schema}}.pgoutbox_ensure_partitions(regclass, int, text) TO %I',
                   r.grantee);
  END LOOP;
END
$do$;

-- Retention refuses a partition holding FAILED rows (rows a poller left to
-- retry); this finds them without a scan, as the other statuses are found.
CREATE INDEX IF NOT EXISTS {{failed_index}}
  ON {{schema}}.{{table}} (created_at, id) WHERE status = 'FAILED';
