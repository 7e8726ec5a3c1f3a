// The same outbox contract as a plain INSERT: the statement an ORM issues
// inside its own transaction when it has no helper for `outbox_publish`.
//
// Cancels an order: marks it cancelled, gives the customer's credit back,
// and inserts an `OrderCancelled` event row into the outbox table, in one
// transaction. The relay treats the row exactly like one written by
// `outbox_publish` (which is this INSERT, RETURNING tracking_id).
//
//   node dist/producer-raw-sql.js <order-id> [<order-id>...]
//
// One JSON line per order on stdout; exit status 1 when any cancellation was
// rolled back (an unknown or already cancelled order).
//
// Environment: DATABASE_URL, OUTBOX_SCHEMA (default public).

import { Pool, type PoolClient } from "pg";
import { databaseUrl, ident, outboxSchema } from "./config";

/** An event to insert into the outbox table. */
export interface OutboxEvent {
  aggregateType: string;
  /** A UUID: the Kafka record's key, so one aggregate's events stay in order. */
  aggregateId: string;
  eventType: string;
  payload: unknown;
  /** Its top-level keys become Kafka headers (e.g. W3C `traceContext`). */
  metadata?: Record<string, unknown>;
}

/**
 * The INSERT for `event`, with `$1`..`$5` placeholders and explicit casts (so
 * drivers that bind every parameter as text, like Prisma's raw queries,
 * work). Only these columns are written: `tracking_id`, `status`,
 * `created_at` and the rest take the table's defaults.
 *
 * From an ORM, inside the transaction that makes the business change:
 *
 *   // Prisma
 *   await prisma.$transaction(async (tx) => {
 *     await tx.order.update({ where: { id }, data: { status: "cancelled" } });
 *     const { text, values } = outboxInsert("public", event);
 *     const [{ tracking_id }] = await tx.$queryRawUnsafe<{ tracking_id: string }[]>(text, ...values);
 *   });
 *
 *   // TypeORM
 *   await dataSource.transaction(async (manager) => {
 *     await manager.update(Order, id, { status: "cancelled" });
 *     const { text, values } = outboxInsert("public", event);
 *     await manager.query(text, values);
 *   });
 *
 *   // Knex: positional bindings are `?`, not `$n` (each $n is used once, in order)
 *   await knex.transaction(async (trx) => {
 *     await trx("orders").where({ id }).update({ status: "cancelled" });
 *     const { text, values } = outboxInsert("public", event);
 *     await trx.raw(text.replace(/\$\d+/g, "?"), values);
 *   });
 *
 * Never send it outside the business transaction (or in a second
 * connection): the event would be committed without the change, or the
 * other way round.
 */
export function outboxInsert(schema: string, event: OutboxEvent): { text: string; values: string[] } {
  return {
    text:
      `INSERT INTO ${ident(schema)}.outbox (aggregate_type, aggregate_id, event_type, payload, metadata) ` +
      `VALUES ($1, $2::uuid, $3, $4::jsonb, $5::jsonb) RETURNING tracking_id`,
    values: [
      event.aggregateType,
      event.aggregateId,
      event.eventType,
      JSON.stringify(event.payload),
      JSON.stringify(event.metadata ?? {}),
    ],
  };
}

/** Cancels a placed order and publishes `OrderCancelled`; returns the event's tracking_id. */
export async function cancelOrder(pool: Pool, schema: string, orderId: string): Promise<string> {
  const s = ident(schema);
  const client: PoolClient = await pool.connect();
  try {
    await client.query("BEGIN");
    const cancelled = await client.query<{ customer_id: string; total: string }>(
      `UPDATE ${s}.orders SET status = 'cancelled' WHERE id = $1 AND status = 'placed' RETURNING customer_id, total`,
      [orderId],
    );
    if (cancelled.rowCount !== 1) throw new Error(`no placed order ${orderId}`);
    const { customer_id: customerId, total } = cancelled.rows[0];
    await client.query(`UPDATE ${s}.customers SET credit = credit + $2 WHERE id = $1`, [customerId, total]);

    const { text, values } = outboxInsert(schema, {
      aggregateType: "Order",
      aggregateId: orderId,
      eventType: "OrderCancelled",
      // numeric comes back from pg as a string; the event carries a number.
      payload: { orderId, customerId, total: Number(total) },
    });
    const inserted = await client.query<{ tracking_id: string }>(text, values);

    await client.query("COMMIT");
    return inserted.rows[0].tracking_id;
  } catch (error) {
    await client.query("ROLLBACK").catch(() => undefined);
    throw error;
  } finally {
    client.release();
  }
}

async function main(): Promise<number> {
  const orderIds = process.argv.slice(2);
  if (orderIds.length === 0) {
    console.error("usage: producer-raw-sql <order-id> [<order-id>...]");
    return 2;
  }
  const schema = outboxSchema();
  const pool = new Pool({ connectionString: databaseUrl() });
  let failed = 0;
  try {
    for (const orderId of orderIds) {
      try {
        const trackingId = await cancelOrder(pool, schema, orderId);
        console.log(JSON.stringify({ committed: true, orderId, trackingId }));
      } catch (error) {
        failed += 1;
        const message = error instanceof Error ? error.message : String(error);
        console.log(JSON.stringify({ committed: false, orderId, error: message }));
        console.error(`producer-raw-sql: cancelling ${orderId} rolled back: ${message}`);
      }
    }
  } finally {
    await pool.end();
  }
  return failed === 0 ? 0 : 1;
}

if (require.main === module) {
  main().then(
    (code) => process.exit(code),
    (error) => {
      console.error(`producer-raw-sql: ${error instanceof Error ? error.message : error}`);
      process.exit(2);
    },
  );
}
