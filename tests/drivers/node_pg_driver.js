// node-postgres through iampool: named queries ({name, text, values}), 32 clients
// (see workload.md). node-postgres prepares a named query once per connection and reuses it.
'use strict';
const { Client } = require('pg');

const CLIENTS = 32;
const ROUNDS = 40;
const Q1 = { name: 'q1', text: 'select $1::int + v as n from items where id = $2' };
const Q2 = { name: 'q2', text: 'select name from items where id = $1' };
const Q3 = { name: 'q3', text: 'select count(*)::int as n from items where v < $1' };
const INSERT = { name: 'ins', text: 'insert into log (tag, client, i, x) values ($1, $2, $3, $4)' };
const SUM = { name: 'sum', text: 'select sum(x)::int as n from log where tag = $1 and client = $2' };

async function client(c, conn, tag, errors) {
  let total = 0;
  let statements = 0;
  const db = new Client(conn);
  await db.connect();
  try {
    for (let i = 0; i < ROUNDS; i++) {
      const k = ((c * 31 + i) % 100) + 1;
      try {
        total += (await db.query({ ...Q1, values: [i, k] })).rows[0].n;
        total += (await db.query({ ...Q2, values: [k] })).rows[0].name.length;
        total += (await db.query({ ...Q3, values: [3 * k] })).rows[0].n;
        await db.query('begin');
        total += (await db.query({ ...Q1, values: [i, k] })).rows[0].n;
        await db.query('commit');
        statements += 4;
      } catch (e) {
        errors.push(`client ${c} round ${i}: ${e.message}`);
        await db.query('rollback').catch(() => {});
      }
    }
    // Pipelined: node-postgres queues these and sends them without waiting.
    const inserts = [];
    for (let i = 0; i < ROUNDS; i++) {
      inserts.push(db.query({ ...INSERT, values: [tag, c, i, c * 1000 + i] }));
    }
    await Promise.all(inserts);
    total += (await db.query({ ...SUM, values: [tag, c] })).rows[0].n;
    statements += 2;
  } catch (e) {
    errors.push(`client ${c}: ${e.message}`);
  } finally {
    await db.end();
  }
  return [total, statements];
}

async function main() {
  const [host, port, user, password, database, tag] = process.argv.slice(2, 8);
  const conn = { host, port: Number(port), user, password, database, ssl: false,
    connectionTimeoutMillis: 20000 };
  const errors = [];
  const results = await Promise.allSettled(
    Array.from({ length: CLIENTS }, (_, c) => client(c, conn, tag, errors)));
  let total = 0;
  let statements = 0;
  for (const r of results) {
    if (r.status === 'rejected') {
      errors.push(String(r.reason));
    } else {
      total += r.value[0];
      statements += r.value[1];
    }
  }
  if (errors.length > 0) {
    for (const e of errors.slice(0, 10)) console.error(e);
    console.log(`RESULT failed ${errors.length}`);
    process.exit(1);
  }
  console.log(`RESULT ok ${total} ${statements}`);
}

main().catch((e) => {
  console.error(e);
  console.log('RESULT failed 1');
  process.exit(1);
});
