-- The publication the CDC relay reads: inserts only, published through the
-- partition root so every partition (present and future) routes as the root.
-- A second outbox table migrated with the same publication name is added to
-- it (several outbox tables, one per service or bounded context).
DO $do$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {{publication_literal}}) THEN
    EXECUTE format(
      'CREATE PUBLICATION %I FOR TABLE %I.%I WITH (publish = %L, publish_via_partition_root = true)',
      {{publication_literal}}, {{schema_literal}}, {{table_literal}}, 'insert');
  ELSIF NOT EXISTS (
    SELECT 1 FROM pg_publication_tables
     WHERE pubname = {{publication_literal}} AND schemaname = {{schema_literal}} AND tablename = {{table_literal}}
  ) THEN
    EXECUTE format('ALTER PUBLICATION %I ADD TABLE %I.%I',
      {{publication_literal}}, {{schema_literal}}, {{table_literal}});
  END IF;
END
$do$;
