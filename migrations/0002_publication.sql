-- The publication the CDC relay reads: inserts only, published through the
-- partition root so every partition (present and future) routes as the root.
DO $do$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {{publication_literal}}) THEN
    EXECUTE format(
      'CREATE PUBLICATION %I FOR TABLE %I.%I WITH (publish = %L, publish_via_partition_root = true)',
      {{publication_literal}}, {{schema_literal}}, {{table_literal}}, 'insert');
  END IF;
END
$do$;
