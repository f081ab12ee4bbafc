#!/usr/bin/env bash
# User-space instructions per transaction of each pooler, counted by valgrind's callgrind.
#
#   benches/callgrind.sh                     # as root on Debian 12; iampool and Debian's PgBouncer
#   PGBOUNCER_EXTRA=/opt/pgbouncer-1.25/bin/pgbouncer PGDOG=/opt/pgdog/pgdog benches/callgrind.sh
#
# For each pooler and workload it runs the pooler under `valgrind --tool=callgrind` twice, once
# for a short pgbench run (-c 1 -t CALLGRIND_SHORT) and once for a long one (-t CALLGRIND_LONG),
# and reports (Ir_long - Ir_short) / (CALLGRIND_LONG - CALLGRIND_SHORT): start-up, logins and
# shutdown are the same in both and cancel out. Same PostgreSQL, configs and variables
# (PGBOUNCER, PGBOUNCER_EXTRA, PGDOG, BENCH_IAMPOOL, BENCH_POOL_SIZE, BENCH_SCALE, BENCH_OUT)
# as compare.sh. Valgrind runs a program ~50x slower: the defaults take a few minutes per pooler.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=callgrind
# shellcheck source=benches/lib.sh
source benches/lib.sh

SHORT=${CALLGRIND_SHORT:-2000}
LONG=${CALLGRIND_LONG:-6000}
read -r -a WORKLOADS <<<"${CALLGRIND_WORKLOADS:-select-simple tpcb-simple}"
SCALE=${BENCH_SCALE:-10}
POOL_SIZE=${BENCH_POOL_SIZE:-20}
MAX_CLIENT_CONN=100
OUT=${BENCH_OUT:-benches/callgrind-$(date -u +%Y-%m-%d-%H%M%S).md}
for n in "$SHORT" "$LONG" "$SCALE" "$POOL_SIZE"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "counts must be positive integers (got '$n')"
done
((LONG > SHORT)) || die "CALLGRIND_LONG ($LONG) must exceed CALLGRIND_SHORT ($SHORT)"
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

# measure NAME WORKLOAD N: sets IR to the Ir of one pooler process under callgrind for one
# pgbench run of N transactions ("-" when the run failed).
RESULTS=$WORK/results.tsv
: >"$RESULTS"
measure() {
  local s=$1 workload=$2 n=$3 file=$WORK/cg-$1-$2-$3.out rc=0
  local args=(-n -c 1 -j 1 -t "$n" -M "${workload#*-}")
  [[ $workload == select-* ]] && args+=(-S)
  START_TRIES=240 start_system "$s" valgrind --tool=callgrind --callgrind-out-file="$file" \
    --dump-instr=no --compress-strings=no
  pg_vacuum
  log "$s: pgbench ${args[*]} under callgrind"
  timeout -k 10 1800 pgbench "${args[@]}" -h 127.0.0.1 -p "${PORT[$s]}" -U bench bench \
    >"$WORK/pgbench.out" 2>&1 || rc=$?
  stop_system "$s" 60
  if ((rc != 0)); then
    log "  pgbench failed (exit $rc): $(grep -m 1 -iE 'error|fatal' "$WORK/pgbench.out" || true)"
    IR=-
    return
  fi
  # The profile's summary line (one file: callgrind sums all threads unless told otherwise).
  IR=$(awk '$1 == "summary:" || $1 == "totals:" {print $2; exit}' "$file" 2>/dev/null || true)
  IR=${IR:--}
  [[ -n ${BENCH_KEEP_WORK:-} ]] || rm -f "$file"
  log "  Ir $IR"
}

START=$(date -u +%FT%TZ)
for w in "${WORKLOADS[@]}"; do
  for s in "${POOLERS[@]}"; do
    measure "$s" "$w" "$SHORT"; short=$IR
    measure "$s" "$w" "$LONG"; long=$IR
    printf '%s\t%s\t%s\t%s\n' "$w" "$s" "$short" "$long" >>"$RESULTS"
  done
done

{
  cat <<EOF
# callgrind: user-space instructions per transaction

Measured $START by \`benches/callgrind.sh\` on $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1),
$(uname -sr); $(valgrind --version). Each pooler ran under
\`valgrind --tool=callgrind --dump-instr=no\` once per pgbench run of \`-n -c 1 -j 1 -t N -M mode\`
(\`-S\` for select-*) with N = $SHORT and N = $LONG; Ir is the instructions executed in the pooler's
user space (all threads), kernel work not included. Per transaction = (Ir($LONG) − Ir($SHORT)) / $((LONG - SHORT)).
Configs as in compare.sh (transaction mode, pool size $POOL_SIZE, md5 client auth).

| workload | system | version | Ir, $SHORT txns | Ir, $LONG txns | instructions per transaction |
|---|---|---|---:|---:|---:|
EOF
  while IFS=$'\t' read -r w s short long; do
    per=-
    if [[ $short =~ ^[0-9]+$ && $long =~ ^[0-9]+$ ]]; then
      per=$(awk -v a="$short" -v b="$long" -v n=$((LONG - SHORT)) 'BEGIN {printf "%.0f", (b - a) / n}')
    fi
    printf '| %s | %s | %s | %s | %s | %s |\n' "$w" "$s" "${VERSION[$s]}" "$short" "$long" "$per"
  done <"$RESULTS"
} >"$WORK/report.md"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/report.md" "$OUT"
cat "$WORK/report.md"
log "report written to $OUT"
