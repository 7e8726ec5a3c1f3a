-- Least privilege (docs/least-privilege.md): the relay calls
-- pgoutbox_ensure_partitions at start, and creating a partition needs the
-- ownership of the outbox table, which a least-privilege relay role must not
-- have. The function becomes SECURITY DEFINER: it runs as its owner (the role
-- that migrates, which owns the table) with a pinned search_path, so nothing
-- the caller puts on its own search_path is resolved inside it. In exchange it
-- only accepts outbox tables pgoutbox migrated in this schema, and EXECUTE is
-- revoked from PUBLIC: only the owner and the roles `pgoutbox migrate
-- --relay-role` grants it to may call it. What it can do stays what it did:
-- create the missing monthly partitions <table>_YYYY_MM, nothing else.
CREATE OR REPLACE FUNCTION {{schema}}.pgoutbox_ensure_partitions(parent regclass, months_ahead int DEFAULT 2)
RETURNS int LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
  start_month date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
  m date;
  part_name text;
  parent_schema text;
  parent_name text;
  created int := 0;
BEGIN
  SELECT n.nspname, c.relname INTO parent_schema, parent_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE c.oid = parent AND c.relkind = 'p';
  IF parent_schema IS DISTINCT FROM {{schema_literal}} OR NOT EXISTS (
       SELECT 1 FROM public.pgoutbox_migrations WHERE target = parent_schema || '.' || parent_name
     ) THEN
    RAISE EXCEPTION 'pgoutbox_ensure_partitions: % is not a partitioned outbox table migrated by pgoutbox in schema %',
      parent, {{schema_literal}}
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF months_ahead < 0 OR months_ahead > 24 THEN
    RAISE EXCEPTION 'pgoutbox_ensure_partitions: months_ahead must be 0..24, not %', months_ahead
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  FOR i IN 0..months_ahead LOOP
    m := (start_month + make_interval(months => i))::date;
    part_name := parent_name || '_' || to_char(m, 'YYYY_MM');
    IF to_regclass(format('%I.%I', parent_schema, part_name)) IS NULL THEN
      EXECUTE format(
        'CREATE TABLE %I.%I PARTITION OF %I.%I FOR VALUES FROM (%L) TO (%L)',
        parent_schema, part_name, parent_schema, parent_name,
        m::timestamp AT TIME ZONE 'UTC',
        (m + interval '1 month')::timestamp AT TIME ZONE 'UTC');
      created := created + 1;
    END IF;
  END LOOP;
  RETURN created;
END
$fn$;

REVOKE ALL ON FUNCTION {{schema}}.pgoutbox_ensure_partitions(regclass, int) FROM PUBLIC;
