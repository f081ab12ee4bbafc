#!/usr/bin/env python3
"""Markdown tables for benches/compare.sh from its runs.tsv and memory.tsv (stdlib only).

runs.tsv columns: round workload clients system order tps latency_avg_ms p50_ms p99_ms
transactions failed user_ticks system_ticks note ("ok" or why the run failed); "-" is missing.
memory.tsv columns: system idle_clients connected failed connect_seconds rss_baseline_kib
rss_held_kib rss_after_kib note.
"""

import argparse
import statistics
import sys

WORKLOAD_TITLES = {
    "select": "select-only (`-S`)",
    "tpcb": "TPC-B-like (pgbench's default script)",
}


def num(v):
    try:
        return float(v)
    except ValueError:
        return None


def kind(system):
    for k in ("pgbouncer", "pgdog", "iampool", "direct"):
        if system.startswith(k):
            return k
    return system


def median(xs):
    return statistics.median(xs) if xs else None


def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}" if digits == 0 else f"{v:.{digits}f}"


def spread(xs, digits=0):
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt(xs[0], digits)
    return f"{fmt(min(xs), digits)}–{fmt(max(xs), digits)}"


def ratio(a, b):
    if a is None or not b:
        return "-"
    return f"{a / b:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--memory")
    ap.add_argument("--clk-tck", type=int, default=100)
    ap.add_argument("--systems", nargs="+", required=True)
    args = ap.parse_args()
    tick_us = 1e6 / args.clk_tck

    rows = []
    with open(args.runs) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) < 14:
                continue
            r = dict(
                round=p[0], workload=p[1], clients=int(p[2]), system=p[3], order=p[4],
                tps=num(p[5]), lat=num(p[6]), p50=num(p[7]), p99=num(p[8]), txns=num(p[9]),
                failed=p[10], ut=num(p[11]), st=num(p[12]), note=p[13],
            )
            r["ok"] = r["note"] == "ok" and r["tps"] is not None
            if r["ok"] and r["txns"] and r["ut"] is not None:
                r["u_us"] = r["ut"] * tick_us / r["txns"]
                r["s_us"] = r["st"] * tick_us / r["txns"]
            else:
                r["u_us"] = r["s_us"] = None
            rows.append(r)

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    clients = sorted(set(r["clients"] for r in rows))
    out = sys.stdout.write

    out("## Throughput, p99 latency and pooler CPU per transaction\n\n")
    out(
        "Medians over the rounds that succeeded (min–max in their own columns). ×direct: median TPS "
        "over direct's; ×best peer: over the best median of the PgBouncer/PgDog builds in this run. "
        "CPU: the pooler process's utime/stime (all threads, /proc/PID/stat) over the run, divided "
        "by the transactions pgbench completed, in µs; direct has no pooler.\n\n"
    )
    for w in workloads:
        base, mode = w.split("-", 1)
        out(f"### {w}: {WORKLOAD_TITLES.get(base, base)}, `-M {mode}`\n\n")
        out(
            "| clients | system | TPS | TPS min–max | ×direct | ×best peer | p99 ms | p99 min–max "
            "| CPU user µs/txn | CPU sys µs/txn | CPU total µs/txn | ok runs |\n"
        )
        out("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
        for c in clients:
            cell = {}
            for s in args.systems:
                runs = [r for r in rows if r["workload"] == w and r["clients"] == c and r["system"] == s]
                good = [r for r in runs if r["ok"]]
                cell[s] = (runs, good, median([r["tps"] for r in good]))
            direct = next((cell[s][2] for s in args.systems if kind(s) == "direct"), None)
            peers = [cell[s][2] for s in args.systems if kind(s) in ("pgbouncer", "pgdog")]
            peers = [p for p in peers if p is not None]
            best = max(peers) if peers else None
            for s in args.systems:
                runs, good, tps = cell[s]
                if not runs:
                    continue
                is_pooler = kind(s) != "direct"
                u = median([r["u_us"] for r in good if r["u_us"] is not None])
                st = median([r["s_us"] for r in good if r["s_us"] is not None])
                tot = median([r["u_us"] + r["s_us"] for r in good if r["u_us"] is not None])
                shown = fmt(tps) if good else "FAILED"
                out(
                    f"| {c} | {s} | {shown} | {spread([r['tps'] for r in good])} "
                    f"| {ratio(tps, direct) if is_pooler else '1.00' if tps else '-'} "
                    f"| {ratio(tps, best) if is_pooler else '-'} "
                    f"| {fmt(median([r['p99'] for r in good if r['p99'] is not None]), 2)} "
                    f"| {spread([r['p99'] for r in good if r['p99'] is not None], 2)} "
                    f"| {fmt(u, 1) if is_pooler else '-'} | {fmt(st, 1) if is_pooler else '-'} "
                    f"| {fmt(tot, 1) if is_pooler else '-'} | {len(good)}/{len(runs)} |\n"
                )
        out("\n")

    if args.memory:
        mem = []
        with open(args.memory) as f:
            for line in f:
                p = line.rstrip("\n").split("\t")
                if len(p) >= 9:
                    mem.append(p)
        if mem:
            out("## Resident memory with idle clients\n\n")
            out(
                "VmRSS of the pooler process: freshly started (baseline), holding the idle clients "
                "(each logged in and ran one `SELECT 1`), and after they all disconnected. Per "
                "client = (held − baseline) / connected.\n\n"
            )
            out(
                "| system | clients asked | connected | connect time s | baseline MiB | held MiB "
                "| per client KiB | after disconnect MiB | after − baseline MiB | note |\n"
            )
            out("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
            for s, asked, conn, _failed, secs, base, held, after, note in (p[:9] for p in mem):
                b, h, a, n = num(base), num(held), num(after), num(conn)
                per = (h - b) / n if (b is not None and h is not None and n) else None
                mib = lambda v: fmt(v / 1024, 1) if v is not None else "-"  # noqa: E731
                out(
                    f"| {s} | {asked} | {conn} | {secs} | {mib(b)} | {mib(h)} | {fmt(per, 1)} "
                    f"| {mib(a)} | {mib(a - b) if (a is not None and b is not None) else '-'} "
                    f"| {note} |\n"
                )
            out("\n")

    out("## Every run\n\n")
    out(
        "| round | workload | clients | system | order | tps | latency avg ms | p50 ms | p99 ms "
        "| transactions | failed | CPU user µs/txn | CPU sys µs/txn | note |\n"
    )
    out("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    for r in rows:
        out(
            f"| {r['round']} | {r['workload']} | {r['clients']} | {r['system']} | {r['order']} "
            f"| {fmt(r['tps'], 1)} | {fmt(r['lat'], 3)} | {fmt(r['p50'], 3)} | {fmt(r['p99'], 3)} "
            f"| {fmt(r['txns'])} | {r['failed']} | {fmt(r['u_us'], 1)} | {fmt(r['s_us'], 1)} "
            f"| {r['note'].replace('|', '/')} |\n"
        )
    out(
        "\norder: position of the system within its cell (1 = ran first). A FAILED run (pgbench exited "
        "non-zero, e.g. clients aborted on an error, or the run timed out) is listed but left out of "
        "the medians. Loopback only, pgbench, PostgreSQL and the pooler share the machine: compare "
        "systems within one report, not absolute numbers across machines.\n"
    )


if __name__ == "__main__":
    main()
