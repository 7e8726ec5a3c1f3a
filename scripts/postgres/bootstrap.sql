-- Roles and database of pgoutbox's test and development PostgreSQL.
-- Idempotent. Run by a superuser connected to any database:
--   scripts/services (as `postgres` over the unix socket), and
--   docker-compose.yml (mounted into /docker-entrypoint-initdb.d, as pgoutbox).
-- Which role may log in how is pg_hba.conf's business: scripts/services writes
-- it, scripts/postgres/docker-hba.sh does the same for the container.
SET client_min_messages = warning;
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgoutbox') THEN
    CREATE ROLE pgoutbox;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgoutbox_md5') THEN
    CREATE ROLE pgoutbox_md5;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgoutbox_clear') THEN
    CREATE ROLE pgoutbox_clear;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgoutbox_trust') THEN
    CREATE ROLE pgoutbox_trust;
  END IF;
END
$$;
SET password_encryption = 'scram-sha-256';
ALTER ROLE pgoutbox SUPERUSER REPLICATION LOGIN PASSWORD 'pgoutbox';
ALTER ROLE pgoutbox_clear NOSUPERUSER REPLICATION LOGIN PASSWORD 'clearpass';
ALTER ROLE pgoutbox_trust NOSUPERUSER REPLICATION LOGIN PASSWORD NULL;
-- Stored as md5, so the md5 method really runs the md5 exchange.
SET password_encryption = 'md5';
ALTER ROLE pgoutbox_md5 NOSUPERUSER REPLICATION LOGIN PASSWORD 'md5pass';
RESET password_encryption;
SELECT 'CREATE DATABASE pgoutbox OWNER pgoutbox'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'pgoutbox') \gexec
GRANT CONNECT, CREATE ON DATABASE pgoutbox TO pgoutbox_md5, pgoutbox_clear, pgoutbox_trust;
\connect pgoutbox
SET client_min_messages = warning;
GRANT USAGE, CREATE ON SCHEMA public TO pgoutbox_md5, pgoutbox_clear, pgoutbox_trust;
