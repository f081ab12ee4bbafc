#!/usr/bin/env bash
# User-space instructions per transaction of each pooler, counted by valgrind's callgrind.
#
#   benches/callgrind.sh                     # as root on Debian 12; iampool and Debian's PgBouncer
#   PGBOUNCER_EXTRA=/opt/pgbouncer-1.25/bin/pgbouncer PGDOG=/opt/pgdog/pgdog benches/callgrind.sh
#
# For each pooler and workload it runs the pooler under `valgrind --tool=callgrind`, warms it
# up with a pgbench run of CALLGRIND_SHORT transactions (-c 1), zeroes the counters, runs
# CALLGRIND_LONG transactions and dumps: Ir / CALLGRIND_LONG is the pooler's instructions per
# transaction, with start-up and server logins left out (they vary from run to run). Same PostgreSQL, configs and variables
# (PGBOUNCER, PGBOUNCER_EXTRA, PGDOG, BENCH_IAMPOOL, BENCH_POOL_SIZE, BENCH_SCALE, BENCH_OUT)
# as compare.sh. Valgrind runs a program ~50x slower: the defaults take a few minutes per pooler.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=callgrind
# shellcheck source=benches/lib.sh
source benches/lib.sh

SHORT=${CALLGRIND_SHORT:-500}
LONG=${CALLGRIND_LONG:-5000}
read -r -a WORKLOADS <<<"${CALLGRIND_WORKLOADS:-select-simple tpcb-simple}"
SCALE=${BENCH_SCALE:-10}
POOL_SIZE=${BENCH_POOL_SIZE:-20}
MAX_CLIENT_CONN=100
OUT=${BENCH_OUT:-benches/callgrind-$(date -u +%Y-%m-%d-%H%M%S).md}
for n in "$SHORT" "$LONG" "$SCALE" "$POOL_SIZE"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "counts must be positive integers (got '$n')"
done

for w in "${WORKLOADS[@]}"; do
  [[ $w =~ ^(select|tpcb)-(simple|extended|prepared)$ ]] ||
    die "unknown workload '$w' in CALLGRIND_WORKLOADS (select|tpcb)-(simple|extended|prepared)"
done
command -v valgrind >/dev/null || die "valgrind is not installed (apt-get install valgrind)"

[[ -n ${BENCH_SKIP_SETUP:-} ]] || scripts/setup.sh
find_iampool
bench_init
STOP_GRACE=60
add_peers
add_iampools "$IAMPOOL_BIN"
mapfile -t POOLERS < <(poolers)
pg_start $((2 * POOL_SIZE * ${#POOLERS[@]} + 20))
for s in "${POOLERS[@]}"; do configure_system "$s"; done

# measure NAME WORKLOAD: starts the pooler under callgrind, runs pgbench for SHORT transactions
# to warm it up (logins, first-use allocations), zeroes the counters (callgrind_control -z),
# runs LONG transactions and dumps (callgrind_control -d). Sets IR to the Ir of that dump: the
# pooler's user-space instructions for the LONG transactions only ("-" when a run failed).
RESULTS=$WORK/results.tsv
: >"$RESULTS"
run_pgbench() {
  local s=$1 workload=$2 n=$3
  local args=(-n -c 1 -j 1 -t "$n" -M "${workload#*-}")
  [[ $workload == select-* ]] && args+=(-S)
  log "$s: pgbench ${args[*]} under callgrind"
  timeout -k 10 1800 pgbench "${args[@]}" -h 127.0.0.1 -p "${PORT[$s]}" -U bench bench \
    >"$WORK/pgbench.out" 2>&1
}
measure() {
  local s=$1 workload=$2 file=$WORK/cg-$1-$2.out rc=0
  START_TRIES=240 start_system "$s" valgrind --tool=callgrind --callgrind-out-file="$file" \
    --dump-instr=no --compress-strings=no
  pg_vacuum
  run_pgbench "$s" "$workload" "$SHORT" || rc=$?
  if ((rc == 0)); then
    callgrind_control -z "${SPID[$s]}" >/dev/null
    run_pgbench "$s" "$workload" "$LONG" || rc=$?
    callgrind_control -d "${SPID[$s]}" >/dev/null
  fi
  stop_system "$s" 60
  if ((rc != 0)); then
    log "  pgbench failed (exit $rc): $(grep -m 1 -iE 'error|fatal' "$WORK/pgbench.out" || true)"
    IR=-
    return
  fi
  # The dump's summary line (callgrind sums all threads unless told otherwise).
  local dump
  dump=$(ls "$file".* 2>/dev/null | head -n 1)
  IR=$(awk '$1 == "summary:" || $1 == "totals:" {print $2; exit}' "$dump" 2>/dev/null || true)
  IR=${IR:--}
  [[ -n ${BENCH_KEEP_WORK:-} ]] || rm -f "$file" "$file".*
  log "  Ir $IR"
}

START=$(date -u +%FT%TZ)
for w in "${WORKLOADS[@]}"; do
  for s in "${POOLERS[@]}"; do
    measure "$s" "$w"
    printf '%s\t%s\t%s\n' "$w" "$s" "$IR" >>"$RESULTS"
  done
done

{
  cat <<EOF
# callgrind: user-space instructions per transaction

Measured $START by \`benches/callgrind.sh\` on $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1),
$(uname -sr); $(valgrind --version). Each pooler ran under
\`valgrind --tool=callgrind --dump-instr=no\`; pgbench \`-n -c 1 -j 1 -M mode\` (\`-S\` for select-*)
first ran $SHORT transactions to warm it up (its logins, first allocations), then the counters were
zeroed (\`callgrind_control -z\`), $LONG transactions ran and the counters were dumped. Ir is the
instructions the pooler executed in user space (all threads) during those $LONG, kernel work not
included; per transaction = Ir / $LONG. Configs as in compare.sh (transaction mode, pool size
$POOL_SIZE, md5 client auth).

| workload | system | version | Ir, $LONG txns | instructions per transaction |
|---|---|---|---:|---:|
EOF
  while IFS=$'\t' read -r w s ir; do
    per=-
    if [[ $ir =~ ^[0-9]+$ ]]; then
      per=$(awk -v a="$ir" -v n="$LONG" 'BEGIN {printf "%.0f", a / n}')
    fi
    printf '| %s | %s | %s | %s | %s |\n' "$w" "$s" "${VERSION[$s]}" "$ir" "$per"
  done <"$RESULTS"
} >"$WORK/report.md"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/report.md" "$OUT"
cat "$WORK/report.md"
log "report written to $OUT"
