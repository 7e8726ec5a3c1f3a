-- `pgoutbox adopt`: the publish function of migration 3 for an adopted
-- table of pgoutbox's shape (the polling framework's tables), made only
-- when the table has the columns it writes with the types it passes and no
-- function of that name and signature exists (never replaces one of the
-- user's). It sets tracking_id itself: the framework's default table
-- declares it NOT NULL without a default.
-- Placeholders as in the numbered migrations (src/outbox/migrate.rs).
DO $adopt$
BEGIN
  IF to_regprocedure(format('%I.%I(text, uuid, text, jsonb, jsonb)',
                            {{schema_literal}}, {{publish_function_literal}})) IS NOT NULL THEN
    RETURN;
  END IF;
  IF (SELECT count(*) FROM pg_attribute a
       WHERE a.attrelid = format('%I.%I', {{schema_literal}}, {{table_literal}})::regclass
         AND a.attnum > 0 AND NOT a.attisdropped
         AND (a.attname, format_type(a.atttypid, NULL)) IN (
               ('tracking_id', 'uuid'), ('aggregate_type', 'text'), ('aggregate_id', 'uuid'),
               ('event_type', 'text'), ('payload', 'jsonb'), ('metadata', 'jsonb'))) < 6 THEN
    RETURN;
  END IF;
  EXECUTE $create$
    CREATE FUNCTION {{schema}}.{{publish_function}}(
      aggregate_type text,
      aggregate_id uuid,
      event_type text,
      payload jsonb,
      metadata jsonb DEFAULT '{}'
    ) RETURNS uuid
    LANGUAGE sql VOLATILE AS $fn$
      INSERT INTO {{schema}}.{{table}} (tracking_id, aggregate_type, aggregate_id, event_type, payload, metadata)
      VALUES (gen_random_uuid(), $1, $2, $3, $4, coalesce($5, '{}'::jsonb))
      RETURNING tracking_id
    $fn$
  $create$;
END
$adopt$;
