// An idempotent Kafka consumer of pgoutbox events, with kafkajs and `pg`.
//
// Delivery is at least once: a relay restart may publish an event again,
// and this consumer gets a record again when it stops between its database
// commit and its offset commit. So for each record, in ONE transaction:
//
//   1. INSERT the event's `tracking_id` header into processed_events
//      ON CONFLICT DO NOTHING: no row inserted = already applied, skip;
//   2. the handler's own writes (here: a row in `order_ledger`);
//   3. COMMIT;
//
// and only then commit the record's Kafka offset (autoCommit is off).
//
// processed_events is the table `pgoutbox migrate` creates (migration 0008):
// one row per (tracking_id, consumer_group), so every consumer group applies
// every event once. Created here too when the consumer's database has none.
//
//   node dist/consumer.js
//
// Environment:
//   KAFKA_BROKERS            bootstrap servers (host:port,...)
//   CONSUMER_TOPICS          comma-separated (default Order.OrderCreated,Order.OrderCancelled,
//                            the relay's default topic template {aggregate_type}.{event_type})
//   CONSUMER_GROUP           Kafka group id, also the marker's consumer_group (default orders-ledger)
//   CONSUMER_DATABASE_URL    the consumer's database (default DATABASE_URL)
//   CONSUMER_SCHEMA          schema of processed_events and order_ledger (default OUTBOX_SCHEMA, or public)
//   CONSUMER_MAX_EVENTS      stop after this many records (applied + duplicates)
//   CONSUMER_IDLE_EXIT_MS    stop when no record arrived for this long; with
//                            CONSUMER_MAX_EVENTS not reached, that is an error (exit 3)
//
// Prints `applied <tracking_id> <topic>[<partition>]@<offset>` or
// `duplicate ...` per record, then `done: <n> applied, <m> duplicates`.

import { Kafka, logLevel, type KafkaMessage } from "kafkajs";
import { Pool, type PoolClient } from "pg";
import { ident, optional, optionalInt, outboxSchema, required } from "./config";
import { registerLz4Codec } from "./lz4";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Creates processed_events (as migration 0008 does) and the handler's table. */
export async function ensureConsumerTables(pool: Pool, schema: string): Promise<void> {
  const s = ident(schema);
  await pool.query(`
    CREATE TABLE IF NOT EXISTS ${s}.processed_events (
      tracking_id     uuid        NOT NULL,
      consumer_group  text        NOT NULL,
      processed_at    timestamptz NOT NULL DEFAULT now(),
      PRIMARY KEY (tracking_id, consumer_group)
    );
    -- The handler's effects. Deliberately no unique key: applying an event
    -- twice would show as two rows.
    CREATE TABLE IF NOT EXISTS ${s}.order_ledger (
      tracking_id  uuid        NOT NULL,
      order_id     uuid        NOT NULL,
      customer_id  text        NOT NULL,
      event_type   text        NOT NULL,
      amount       numeric     NOT NULL,
      applied_at   timestamptz NOT NULL DEFAULT now()
    )`);
}

/** What `processOnce` did. */
export type Processed = "applied" | "duplicate";

/**
 * Runs `handler` and records `trackingId` for `group` in one transaction, or
 * does nothing when the marker already exists. The marker is inserted FIRST:
 * a second consumer handling the same event at the same moment waits on its
 * row lock, then skips (if the first committed) or applies (if it rolled
 * back). A separate "is it processed?" query before the work would race.
 */
export async function processOnce(
  pool: Pool,
  schema: string,
  trackingId: string,
  group: string,
  handler: (tx: PoolClient) => Promise<void>,
): Promise<Processed> {
  const client = await pool.connect();
  try {
    await client.query("BEGIN");
    const marked = await client.query(
      `INSERT INTO ${ident(schema)}.processed_events (tracking_id, consumer_group) VALUES ($1, $2) ` +
        `ON CONFLICT DO NOTHING`,
      [trackingId, group],
    );
    if (marked.rowCount === 0) {
      await client.query("ROLLBACK");
      return "duplicate";
    }
    await handler(client);
    // A handler that caught an SQL error leaves the transaction aborted;
    // PostgreSQL then answers COMMIT with ROLLBACK, without an error.
    const committed = await client.query("COMMIT");
    if (committed.command !== "COMMIT") {
      throw new Error(`event ${trackingId}: the transaction was rolled back (a failed statement in the handler?)`);
    }
    return "applied";
  } catch (error) {
    await client.query("ROLLBACK").catch(() => undefined);
    throw error;
  } finally {
    client.release();
  }
}

/** A header's value as text (kafkajs gives Buffers). */
function header(message: KafkaMessage, name: string): string | undefined {
  const value = message.headers?.[name];
  const first = Array.isArray(value) ? value[0] : value;
  return first === undefined ? undefined : first.toString();
}

/** The business handler: one ledger row per order event. */
async function applyOrderEvent(tx: PoolClient, schema: string, trackingId: string, eventType: string, payload: unknown) {
  const order = payload as { orderId: string; customerId: string; total: number };
  let amount: number;
  switch (eventType) {
    case "OrderCreated":
      amount = order.total;
      break;
    case "OrderCancelled":
      amount = -order.total;
      break;
    default:
      return; // Not ours: marked as processed, nothing to do.
  }
  await tx.query(
    `INSERT INTO ${ident(schema)}.order_ledger (tracking_id, order_id, customer_id, event_type, amount) ` +
      `VALUES ($1, $2, $3, $4, $5)`,
    [trackingId, order.orderId, order.customerId, eventType, amount],
  );
}

async function main(): Promise<number> {
  const brokers = required("KAFKA_BROKERS").split(",");
  const topics = optional("CONSUMER_TOPICS", "Order.OrderCreated,Order.OrderCancelled").split(",");
  const group = optional("CONSUMER_GROUP", "orders-ledger");
  const schema = optional("CONSUMER_SCHEMA", outboxSchema());
  const maxEvents = optionalInt("CONSUMER_MAX_EVENTS");
  const idleExitMs = optionalInt("CONSUMER_IDLE_EXIT_MS");

  const pool = new Pool({ connectionString: optional("CONSUMER_DATABASE_URL", required("DATABASE_URL")) });
  await ensureConsumerTables(pool, schema);

  // The relay's default compression; kafkajs has gzip only (see lz4.ts).
  registerLz4Codec();
  const kafka = new Kafka({ clientId: `pgoutbox-example-${group}`, brokers, logLevel: logLevel.WARN });
  // kafkajs reads with isolation.level=read_committed by default
  // (readUncommitted: false), which exactly-once delivery needs; said here
  // on purpose. It changes nothing under at-least-once delivery.
  const consumer = kafka.consumer({ groupId: group, readUncommitted: false });

  let applied = 0;
  let duplicates = 0;
  let failure: Error | undefined;
  let stop!: () => void;
  const stopped = new Promise<void>((resolve) => (stop = resolve));
  // No more fetching once stopping; the current record decides the rest.
  const halt = () => {
    consumer.pause(topics.map((topic) => ({ topic })));
    stop();
  };
  let idleTimer: NodeJS.Timeout | undefined;
  const armIdleTimer = () => {
    if (idleExitMs === undefined) return;
    clearTimeout(idleTimer);
    idleTimer = setTimeout(stop, idleExitMs);
  };
  for (const signal of ["SIGINT", "SIGTERM"] as const) process.once(signal, () => stop());

  await consumer.connect();
  await consumer.subscribe({ topics, fromBeginning: true });
  armIdleTimer();
  await consumer.run({
    autoCommit: false,
    eachMessage: async ({ topic, partition, message }) => {
      if (failure !== undefined || (maxEvents !== undefined && applied + duplicates >= maxEvents)) {
        // Stopping: leave the record (and its offset) for the next run.
        throw new Error("stopping");
      }
      const where = `${topic}[${partition}]@${message.offset}`;
      try {
        const trackingId = header(message, "tracking_id");
        if (trackingId === undefined || !UUID.test(trackingId)) {
          throw new Error(`${where}: no valid tracking_id header (${trackingId}); not a pgoutbox record?`);
        }
        const eventType = header(message, "event_type") ?? "";
        const payload: unknown = JSON.parse(message.value?.toString() ?? "null");

        const outcome = await processOnce(pool, schema, trackingId, group, (tx) =>
          applyOrderEvent(tx, schema, trackingId, eventType, payload),
        );
        // The event's effects are durable: only now may Kafka forget it.
        await consumer.commitOffsets([{ topic, partition, offset: (BigInt(message.offset) + 1n).toString() }]);

        if (outcome === "applied") applied += 1;
        else duplicates += 1;
        console.log(`${outcome} ${trackingId} ${where}`);
      } catch (error) {
        // Not committed: the record is read again by the next run.
        failure = error instanceof Error ? error : new Error(String(error));
        halt();
        throw failure;
      }
      armIdleTimer();
      if (maxEvents !== undefined && applied + duplicates >= maxEvents) halt();
    },
  });

  await stopped;
  clearTimeout(idleTimer);
  await consumer.disconnect();
  await pool.end();
  console.log(`done: ${applied} applied, ${duplicates} duplicates`);
  if (failure !== undefined) {
    console.error(`consumer: ${failure.message}`);
    return 1;
  }
  if (maxEvents !== undefined && applied + duplicates < maxEvents) {
    console.error(`consumer: no record for ${idleExitMs} ms after ${applied + duplicates} of ${maxEvents} events`);
    return 3;
  }
  return 0;
}

if (require.main === module) {
  main().then(
    (code) => process.exit(code),
    (error) => {
      console.error(`consumer: ${error instanceof Error ? error.message : error}`);
      process.exit(2);
    },
  );
}
