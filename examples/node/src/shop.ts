// The producers' business tables: customers with a credit limit, and their
// orders. They live in the same database as the outbox (the whole point: one
// transaction writes both), here in the outbox's schema to keep the demo in
// one place.

import type { Pool } from "pg";
import { ident } from "./config";

/** Creates `customers` and `orders` in `schema` if missing. */
export async function ensureShopTables(pool: Pool, schema: string): Promise<void> {
  const s = ident(schema);
  await pool.query(`
    CREATE TABLE IF NOT EXISTS ${s}.customers (
      id      text    PRIMARY KEY,
      -- The business rule that can fail *after* the event is written:
      -- an order is charged to the credit, which may not go negative.
      credit  numeric NOT NULL CHECK (credit >= 0)
    );
    CREATE TABLE IF NOT EXISTS ${s}.orders (
      id           uuid        PRIMARY KEY,
      customer_id  text        NOT NULL REFERENCES ${s}.customers (id),
      total        numeric     NOT NULL CHECK (total > 0),
      status       text        NOT NULL DEFAULT 'placed' CHECK (status IN ('placed', 'cancelled')),
      created_at   timestamptz NOT NULL DEFAULT now()
    )`);
}

/** Opens an account with `credit` unless the customer already has one. */
export async function openAccount(pool: Pool, schema: string, customerId: string, credit: number): Promise<void> {
  await pool.query(
    `INSERT INTO ${ident(schema)}.customers (id, credit) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING`,
    [customerId, credit],
  );
}
