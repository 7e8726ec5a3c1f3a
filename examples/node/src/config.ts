// Settings shared by the examples, all from the environment, so the same
// build runs against `scripts/services` (eval "$(scripts/services env)"),
// a test's private schema, or production.

/** A required environment variable; a clear error names it when unset. */
export function required(name: string): string {
  const value = process.env[name];
  if (value === undefined || value === "") {
    throw new Error(`${name} is not set (against the project's services: set -a; eval "$(scripts/services env)"; set +a)`);
  }
  return value;
}

/** An optional environment variable with a default. */
export function optional(name: string, fallback: string): string {
  const value = process.env[name];
  return value === undefined || value === "" ? fallback : value;
}

/** An optional positive integer from the environment. */
export function optionalInt(name: string): number | undefined {
  const value = process.env[name];
  if (value === undefined || value === "") return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n <= 0) throw new Error(`${name}=${value}: not a positive integer`);
  return n;
}

/** PostgreSQL connection URL: the producer's database holds the outbox. */
export const databaseUrl = (): string => required("DATABASE_URL");

/**
 * Schema of the outbox table and of `outbox_publish` (`pgoutbox migrate`
 * creates both; `[outbox] schema` / OUTBOX_SCHEMA in the relay's settings).
 */
export const outboxSchema = (): string => optional("OUTBOX_SCHEMA", "public");

/** Quotes an SQL identifier (a schema name from the environment). */
export function ident(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}
