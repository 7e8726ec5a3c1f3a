// Publishing an event inside the business transaction, with `pg`.
//
// The order and its `OrderCreated` event are written in ONE transaction:
// either both are committed or neither is. pgoutbox then relays the event
// row from the WAL to Kafka (topic `Order.OrderCreated` by default, key =
// the order id, value = the payload, header `tracking_id` = the event id).
//
//   node dist/producer.js <customer-id> <total> [<total>...]
//
// Each total is one order in a transaction of its own. A customer is opened
// with DEMO_CREDIT (default 100) on first sight; an order the credit cannot
// cover fails *after* its event was written, and the ROLLBACK takes the
// event back with the order: nothing reaches Kafka. One JSON line per order
// on stdout; exit status 1 when any order was rolled back.
//
// Environment: DATABASE_URL, OUTBOX_SCHEMA (default public), DEMO_CREDIT.

import { randomUUID } from "node:crypto";
import { Pool } from "pg";
import { databaseUrl, ident, optional, outboxSchema } from "./config";
import { ensureShopTables, openAccount } from "./shop";

/** What `placeOrder` committed. */
export interface PlacedOrder {
  orderId: string;
  /** The event's id, as `outbox_publish` returned it: the Kafka `tracking_id` header. */
  trackingId: string;
}

/**
 * Places an order: inserts it, publishes `OrderCreated`, charges the
 * customer's credit, all in one transaction (the same shape as the polling
 * framework's `PublishEventUseCase.execute` inside BEGIN/COMMIT).
 */
export async function placeOrder(
  pool: Pool,
  schema: string,
  order: { orderId: string; customerId: string; total: number },
): Promise<PlacedOrder> {
  const s = ident(schema);
  const client = await pool.connect();
  try {
    await client.query("BEGIN");

    // a) The business change.
    await client.query(`INSERT INTO ${s}.orders (id, customer_id, total) VALUES ($1, $2, $3)`, [
      order.orderId,
      order.customerId,
      order.total,
    ]);

    // b) The event, in the same transaction. outbox_publish(aggregate_type,
    //    aggregate_id uuid, event_type, payload jsonb, metadata jsonb
    //    DEFAULT '{}') inserts the outbox row and returns its tracking_id.
    //    metadata's top-level keys become Kafka headers.
    const published = await client.query<{ tracking_id: string }>(
      `SELECT ${s}.outbox_publish($1, $2, $3, $4, $5) AS tracking_id`,
      [
        "Order",
        order.orderId,
        "OrderCreated",
        JSON.stringify({ orderId: order.orderId, customerId: order.customerId, total: order.total }),
        JSON.stringify({ schema_version: "1" }),
      ],
    );

    // c) More business work that may still fail: the credit check
    //    (CHECK credit >= 0) rejects an order the customer cannot afford.
    const charged = await client.query(`UPDATE ${s}.customers SET credit = credit - $2 WHERE id = $1`, [
      order.customerId,
      order.total,
    ]);
    if (charged.rowCount !== 1) throw new Error(`no customer ${order.customerId}`);

    await client.query("COMMIT");
    return { orderId: order.orderId, trackingId: published.rows[0].tracking_id };
  } catch (error) {
    // The order AND its event go: a rolled-back event never reaches Kafka.
    await client.query("ROLLBACK").catch(() => undefined);
    throw error;
  } finally {
    client.release();
  }
}

async function main(): Promise<number> {
  const [customerId, ...totals] = process.argv.slice(2);
  if (customerId === undefined || totals.length === 0) {
    console.error("usage: producer <customer-id> <total> [<total>...]");
    return 2;
  }
  const schema = outboxSchema();
  const pool = new Pool({ connectionString: databaseUrl() });
  let failed = 0;
  try {
    await ensureShopTables(pool, schema);
    await openAccount(pool, schema, customerId, Number(optional("DEMO_CREDIT", "100")));
    for (const total of totals) {
      const orderId = randomUUID();
      try {
        const placed = await placeOrder(pool, schema, { orderId, customerId, total: Number(total) });
        console.log(JSON.stringify({ committed: true, total: Number(total), ...placed }));
      } catch (error) {
        failed += 1;
        const message = error instanceof Error ? error.message : String(error);
        console.log(JSON.stringify({ committed: false, total: Number(total), orderId, error: message }));
        console.error(`producer: order ${orderId} (total ${total}) rolled back: ${message}`);
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
      console.error(`producer: ${error instanceof Error ? error.message : error}`);
      process.exit(2);
    },
  );
}
