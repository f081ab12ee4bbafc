"""asyncpg through iampool: default statement cache, 32 connections (see workload.md)."""
import asyncio
import sys

import asyncpg

CLIENTS, ROUNDS = 32, 40
Q1 = "select $1::int + v from items where id = $2"
Q2 = "select name from items where id = $1"
Q3 = "select count(*) from items where v < $1"


async def client(c, dsn, tag, errors):
    total = statements = 0
    conn = await asyncpg.connect(**dsn)  # statement_cache_size stays at its default
    try:
        q1 = await conn.prepare(Q1)
        for i in range(ROUNDS):
            k = (c * 31 + i) % 100 + 1
            try:
                total += await q1.fetchval(i, k)
                rows = await conn.fetch(Q2, k)
                total += len(rows[0]["name"])
                total += await conn.fetchval(Q3, 3 * k)
                async with conn.transaction():
                    total += await conn.fetchval(Q1, i, k)
                statements += 4
            except Exception as e:  # every failure is counted and reported
                errors.append(f"client {c} round {i}: {type(e).__name__}: {e}")
        await conn.executemany(
            "insert into log (tag, client, i, x) values ($1, $2, $3, $4)",
            [(tag, c, i, c * 1000 + i) for i in range(ROUNDS)],
        )
        total += await conn.fetchval(
            "select sum(x) from log where tag = $1 and client = $2", tag, c
        )
        statements += 2
    except Exception as e:
        errors.append(f"client {c}: {type(e).__name__}: {e}")
    finally:
        await conn.close()
    return total, statements


async def main():
    host, port, user, password, dbname, tag = sys.argv[1:7]
    dsn = dict(host=host, port=int(port), user=user, password=password,
               database=dbname, ssl=False)
    errors = []
    results = await asyncio.gather(*(client(c, dsn, tag, errors) for c in range(CLIENTS)),
                                   return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            errors.append(f"{type(r).__name__}: {r}")
    if errors:
        for e in errors[:10]:
            print(e, file=sys.stderr)
        print(f"RESULT failed {len(errors)}")
        sys.exit(1)
    print(f"RESULT ok {sum(t for t, _ in results)} {sum(s for _, s in results)}")


asyncio.run(main())
