"""psycopg 3 through iampool: prepare_threshold=0 (every query prepared server-side), 32 threads
(see workload.md)."""
import sys
import threading

import psycopg

CLIENTS, ROUNDS = 32, 40
Q1 = "select %s::int + v from items where id = %s"
Q2 = "select name from items where id = %s"
Q3 = "select count(*) from items where v < %s"


def client(c, conninfo, tag, errors, results):
    total = statements = 0
    try:
        with psycopg.connect(conninfo, prepare_threshold=0, autocommit=True) as conn:
            for i in range(ROUNDS):
                k = (c * 31 + i) % 100 + 1
                try:
                    total += conn.execute(Q1, (i, k)).fetchone()[0]
                    total += len(conn.execute(Q2, (k,)).fetchone()[0])
                    total += conn.execute(Q3, (3 * k,)).fetchone()[0]
                    with conn.transaction():
                        total += conn.execute(Q1, (i, k)).fetchone()[0]
                    statements += 4
                except Exception as e:  # every failure is counted and reported
                    errors.append(f"client {c} round {i}: {type(e).__name__}: {e}")
            with conn.cursor() as cur:
                cur.executemany(
                    "insert into log (tag, client, i, x) values (%s, %s, %s, %s)",
                    [(tag, c, i, c * 1000 + i) for i in range(ROUNDS)],
                )
            total += conn.execute(
                "select sum(x) from log where tag = %s and client = %s", (tag, c)
            ).fetchone()[0]
            statements += 2
    except Exception as e:
        errors.append(f"client {c}: {type(e).__name__}: {e}")
    results[c] = (total, statements)


def main():
    host, port, user, password, dbname, tag = sys.argv[1:7]
    conninfo = psycopg.conninfo.make_conninfo(
        host=host, port=port, user=user, password=password, dbname=dbname,
        sslmode="disable", connect_timeout="20")
    errors, results = [], [(0, 0)] * CLIENTS
    threads = [threading.Thread(target=client, args=(c, conninfo, tag, errors, results))
               for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for e in errors[:10]:
            print(e, file=sys.stderr)
        print(f"RESULT failed {len(errors)}")
        sys.exit(1)
    print(f"RESULT ok {sum(t for t, _ in results)} {sum(s for _, s in results)}")


main()
