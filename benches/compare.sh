#!/usr/bin/env bash
# pgbench side by side in one run: direct PostgreSQL 15, PgBouncer (one or more builds), PgDog
# (optional) and iampool; then resident memory with 10,000 idle clients. benches/README.md
# documents every variable and column.
#
#   benches/compare.sh                       # as root on Debian 12
#   PGBOUNCER_EXTRA=/opt/pgbouncer-1.25/bin/pgbouncer PGDOG=/opt/pgdog/pgdog benches/compare.sh
#   BENCH_SECONDS=3 BENCH_ROUNDS=1 BENCH_CLIENT_COUNTS="1 64" benches/compare.sh   # smoke run
#
# Everything it starts and its temp dir are removed on exit, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=compare
# shellcheck source=benches/lib.sh
source benches/lib.sh

ROUNDS=${BENCH_ROUNDS:-3}
SECONDS_PER_RUN=${BENCH_SECONDS:-15}
read -r -a CLIENT_COUNTS <<<"${BENCH_CLIENT_COUNTS:-1 64 256}"
read -r -a WORKLOADS <<<"${BENCH_WORKLOADS:-select-simple select-extended select-prepared tpcb-simple}"
THREADS=${BENCH_THREADS:-2}
SCALE=${BENCH_SCALE:-10}
POOL_SIZE=${BENCH_POOL_SIZE:-20}
IDLE_CLIENTS=${BENCH_IDLE_CLIENTS:-10000}
IDLE_AFTER=${BENCH_IDLE_SETTLE:-5}
OUT=${BENCH_OUT:-benches/results-$(date -u +%Y-%m-%d-%H%M%S).md}

for n in "$ROUNDS" "$SECONDS_PER_RUN" "$THREADS" "$SCALE" "$POOL_SIZE" "${CLIENT_COUNTS[@]}"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "BENCH_* counts must be positive integers (got '$n')"
done
[[ $IDLE_CLIENTS =~ ^[0-9]+$ && $IDLE_AFTER =~ ^[0-9]+$ ]] ||
  die "BENCH_IDLE_CLIENTS and BENCH_IDLE_SETTLE must be whole numbers"
for w in "${WORKLOADS[@]}"; do
  [[ $w =~ ^(select|tpcb)-(simple|extended|prepared)$ ]] ||
    die "unknown workload '$w' in BENCH_WORKLOADS (select|tpcb)-(simple|extended|prepared)"
done
MAX_CLIENTS=$(printf '%s\n' "${CLIENT_COUNTS[@]}" | sort -n | tail -n 1)

# ---------------------------------------------------------------- tools and limits
[[ -n ${BENCH_SKIP_SETUP:-} ]] || scripts/setup.sh
find_iampool
# Each pooler holds IDLE_CLIENTS sockets, and so does the client program: raise the soft
# open-files limit to the hard one (root in a container may not raise the hard one).
hard=$(ulimit -Hn)
[[ $hard == unlimited ]] && hard=1048576
ulimit -n "$hard" 2>/dev/null || true
if ((IDLE_CLIENTS + 200 > $(ulimit -n))); then
  log "open-files limit $(ulimit -n) is too low for $IDLE_CLIENTS idle clients; using $(($(ulimit -n) - 200))"
  IDLE_CLIENTS=$(($(ulimit -n) - 200))
fi
MAX_CLIENT_CONN=$((IDLE_CLIENTS + MAX_CLIENTS + 100))

bench_init
add_system direct
add_peers
add_iampools "$IAMPOOL_BIN"
mapfile -t POOLERS < <(poolers)
# Direct runs open MAX_CLIENTS backends while every pooler may keep POOL_SIZE idle servers (x2
# for the odd extra one during a login), plus room for psql and pgbench's own connection.
MAX_CONNECTIONS=$((MAX_CLIENTS + 2 * POOL_SIZE * ${#POOLERS[@]} + 20))
((MAX_CONNECTIONS >= 100)) || MAX_CONNECTIONS=100
pg_start "$MAX_CONNECTIONS"
for s in "${SYSTEMS[@]}"; do configure_system "$s"; done
for s in "${POOLERS[@]}"; do
  log "starting $s ${VERSION[$s]} on port ${PORT[$s]}"
  start_system "$s"
done

# ---------------------------------------------------------------- pgbench runs
RUNS=$WORK/runs.tsv
: >"$RUNS"
mkdir -p "$WORK/pgbench"
RUN_GRACE=$((30 + MAX_CLIENTS / 10))

pgbench_args() {
  local workload=$1 clients=$2 j=$THREADS
  ((j <= clients)) || j=$clients
  ARGS=(-n -c "$clients" -j "$j" -T "$SECONDS_PER_RUN" -M "${workload#*-}")
  [[ $workload == select-* ]] && ARGS+=(-S)
  return 0
}

# p50 and p99 latency in ms from pgbench -l per-transaction logs (3rd field: latency in µs).
percentiles() {
  cat "$@" 2>/dev/null | awk '$3 ~ /^[0-9]+$/ {print $3}' | sort -n -S 256M |
    awk '{v[NR] = $1} END {
      if (NR == 0) {print "- -"; exit}
      i50 = int(NR * 0.50 + 0.999999); i99 = int(NR * 0.99 + 0.999999)
      printf "%.3f %.3f\n", v[i50] / 1000, v[i99] / 1000 }'
}

# run_one ROUND WORKLOAD CLIENTS SYSTEM ORDER: one pgbench run, one line in runs.tsv.
run_one() {
  local round=$1 workload=$2 clients=$3 s=$4 order=$5 rc=0 note=
  local out=$WORK/pgbench/out prefix=$WORK/pgbench/txn
  pgbench_args "$workload" "$clients"
  ensure_up "$s" "before round $round $workload c=$clients" || true
  rm -f "$prefix".*
  pg_vacuum
  local pid=${SPID[$s]:-} before=(- -) after=(- -)
  [[ -n $pid ]] && read -r -a before <<<"$(cpu_ticks "$pid")"
  log "round $round: pgbench ${ARGS[*]} -> $s"
  timeout -k 10 $((SECONDS_PER_RUN + RUN_GRACE)) pgbench "${ARGS[@]}" -l --log-prefix="$prefix" \
    -h 127.0.0.1 -p "${PORT[$s]}" -U bench bench >"$out" 2>&1 || rc=$?
  [[ -n $pid ]] && read -r -a after <<<"$(cpu_ticks "$pid")"
  if ! ensure_up "$s" "during round $round $workload c=$clients"; then
    ((rc != 0)) || rc=1
    note="$s exited during this run; "
  fi
  local tps lat txns failed p50 p99 ut=- st=-
  tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$out" | head -n 1)
  lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$out" | head -n 1)
  txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -n 1)
  failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out" | head -n 1)
  read -r p50 p99 <<<"$(percentiles "$prefix".*)"
  rm -f "$prefix".*
  if [[ ${before[0]} != - && ${after[0]} != - ]]; then
    ut=$((after[0] - before[0])); st=$((after[1] - before[1]))
  fi
  if ((rc != 0)) || [[ -z $tps ]]; then
    local why
    why=$(grep -m 1 -iE 'error|fatal|abort' "$out" | sed 's/^\(pgbench: \)*//' | tr -s ' \t' ' ' |
      tr '|' '/' | cut -c 1-140 || true)
    ((rc == 124 || rc == 137)) && why="timed out after $((SECONDS_PER_RUN + RUN_GRACE)) s; $why"
    note="FAILED (exit $rc): $note${why:-no output}"
    log "  $note"
  else
    log "  tps $tps, p99 $p99 ms, cpu ticks user $ut sys $st"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$workload" "$clients" \
    "$s" "$order" "${tps:--}" "${lat:--}" "$p50" "$p99" "${txns:--}" "${failed:--}" "$ut" "$st" \
    "${note:-ok}" >>"$RUNS"
}

# A short run through each pooler with POOL_SIZE clients, so every pool holds its servers
# before measuring (server logins are SCRAM: they would otherwise land in the first runs' CPU).
warm_up() {
  local s j=$THREADS
  ((j <= POOL_SIZE)) || j=$POOL_SIZE
  for s in "${POOLERS[@]}"; do
    ensure_up "$s" "before warm-up" || true
    timeout -k 5 30 pgbench -n -S -c "$POOL_SIZE" -j "$j" -T 2 -h 127.0.0.1 -p "${PORT[$s]}" \
      -U bench bench >/dev/null 2>&1 || log "warm-up through $s failed"
  done
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date -u +%FT%TZ)
START_S=$(date +%s)
NSYS=${#SYSTEMS[@]}
cell=0
for ((round = 1; round <= ROUNDS; round++)); do
  warm_up
  for workload in "${WORKLOADS[@]}"; do
    for clients in "${CLIENT_COUNTS[@]}"; do
      # Round-robin: each cell starts with the next system, so drift hits all alike.
      for ((k = 0; k < NSYS; k++)); do
        s=${SYSTEMS[$(((cell + k) % NSYS))]}
        run_one "$round" "$workload" "$clients" "$s" "$((k + 1))"
      done
      cell=$((cell + 1))
    done
  done
done
RUNS_S=$(($(date +%s) - START_S))

# ---------------------------------------------------------------- idle-client memory
MEM=$WORK/memory.tsv
: >"$MEM"
idle_test() {
  local s=$1 base held after line connected=- failed=- secs=- note=ok
  log "memory: $s with $IDLE_CLIENTS idle clients"
  stop_system "$s"
  start_system "$s"
  sleep 1
  base=$(rss_kib "${SPID[$s]}")
  local out=$WORK/idle-$s.out
  python3 benches/idle_clients.py --port "${PORT[$s]}" -n "$IDLE_CLIENTS" --hold 900 \
    >"$out" 2>"$WORK/idle-$s.err" &
  IDLE_PID=$!
  for _ in $(seq 600); do
    grep -q '^HOLDING' "$out" 2>/dev/null && break
    kill -0 "$IDLE_PID" 2>/dev/null || break
    sleep 0.5
  done
  line=$(grep '^HOLDING' "$out" 2>/dev/null || true)
  if [[ -n $line ]]; then
    [[ $line =~ connected=([0-9]+)\ failed=([0-9]+)\ seconds=([0-9.]+) ]] &&
      { connected=${BASH_REMATCH[1]}; failed=${BASH_REMATCH[2]}; secs=${BASH_REMATCH[3]}; }
    sleep 2
    held=$(rss_kib "${SPID[$s]}")
    ((failed == 0)) || note="$(head -n 1 "$WORK/idle-$s.err" | tr '|\t' '/ ' | cut -c 1-160)"
  else
    held=-
    note="client program did not finish connecting: $(tail -n 1 "$WORK/idle-$s.err" | tr '|\t' '/ ' | cut -c 1-160)"
  fi
  kill -USR1 "$IDLE_PID" 2>/dev/null || true
  for _ in $(seq 120); do kill -0 "$IDLE_PID" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$IDLE_PID" 2>/dev/null || true
  wait "$IDLE_PID" 2>/dev/null || true
  IDLE_PID=
  sleep "$IDLE_AFTER"
  if alive "$s"; then after=$(rss_kib "${SPID[$s]}"); else after=-; note="$s exited; $note"; fi
  log "  rss KiB: baseline $base, held $held, after $after ($connected connected)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$IDLE_CLIENTS" "$connected" "$failed" "$secs" \
    "$base" "$held" "$after" "$note" >>"$MEM"
}
if ((IDLE_CLIENTS > 0)); then
  for s in "${POOLERS[@]}"; do idle_test "$s"; done
fi
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
TOTAL_S=$(($(date +%s) - START_S))

# ---------------------------------------------------------------- report
header() {
  local s
  cat <<EOF
# pgbench and idle-client memory: direct PostgreSQL vs ${POOLERS[*]}

Measured $START by \`benches/compare.sh\`: $ROUNDS round(s); within a round every workload and
client count is run against each system in turn, the first system rotating from cell to cell.
Each pgbench run lasts ${SECONDS_PER_RUN} s. Runs took ${RUNS_S} s, everything ${TOTAL_S} s.

## Machine

| | |
|---|---|
| CPU | $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores (nproc) |
| Memory | $(awk '$1 == "MemTotal:" {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) |
| Kernel | $(uname -sr) |
| Load average before / after | $LOAD_BEFORE / $LOAD_AFTER |

## Versions

| system | version | binary |
|---|---|---|
| PostgreSQL | $("$PG_BIN/postgres" --version | sed 's/^postgres (PostgreSQL) //') | $PG_BIN/postgres |
| pgbench | $(pgbench --version | sed 's/^pgbench (PostgreSQL) //') | $(command -v pgbench) |
EOF
  for s in "${POOLERS[@]}"; do
    if [[ ${KIND[$s]} == iampool ]]; then
      printf '| %s | %s, commit %s | %s |\n' "$s" "${VERSION[$s]}" "$(iampool_commit)" "${BIN[$s]}"
    else
      printf '| %s | %s | %s |\n' "$s" "${VERSION[$s]}" "${BIN[$s]}"
    fi
  done
  local ex
  pgbench_args "${WORKLOADS[0]}" "${CLIENT_COUNTS[-1]}"
  ex=$(printf '%s ' pgbench "${ARGS[@]}" -l "--log-prefix=TMP/txn" -h 127.0.0.1 -p PORT -U bench bench)
  cat <<EOF

## Commands and configuration

PostgreSQL 15 in a temp dir: \`max_connections = $MAX_CONNECTIONS\`, \`shared_buffers = 256MB\`,
\`fsync = off\`, \`synchronous_commit = off\`, \`full_page_writes = off\`, 127.0.0.1 with
scram-sha-256; \`pgbench -i -s $SCALE\`. Clients reach every pooler with md5 over plaintext TCP;
poolers log in to PostgreSQL with SCRAM. Before each round, $POOL_SIZE clients run 2 s through each
pooler so that its pool is full.

Each run: \`VACUUM pgbench_branches; VACUUM pgbench_tellers; TRUNCATE pgbench_history\` directly
on PostgreSQL (what pgbench does without \`-n\`), then, e.g. for the last cell of ${WORKLOADS[0]}:

    $ex

\`-M simple|extended|prepared\` per workload, \`-S\` for select-*, no \`-S\` (built-in TPC-B-like script) for
tpcb-*, \`-c\` each of ${CLIENT_COUNTS[*]}, \`-j min($THREADS, clients)\`, \`timeout $((SECONDS_PER_RUN + RUN_GRACE))\` s.
Idle clients: \`python3 benches/idle_clients.py --port PORT -n $IDLE_CLIENTS\` (md5 login, one
\`SELECT 1\` each, then held); VmRSS from /proc/PID/status on a freshly started pooler, with all
connected (+2 s), and ${IDLE_AFTER} s after they disconnected.

EOF
  for s in "${POOLERS[@]}"; do
    printf '%s:\n\n' "$s"
    show_config "$s" | sed 's/^/    /'
    echo
  done
}

{
  header
  python3 benches/report.py --runs "$RUNS" --memory "$MEM" --clk-tck "$CLK_TCK" \
    --systems "${SYSTEMS[@]}"
  if ((${#EVENTS[@]})); then
    printf '\n## Events\n\n'
    for e in "${EVENTS[@]}"; do printf -- '- %s\n' "$e"; done
  fi
} >"$WORK/report.md"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/report.md" "$OUT"
cat "$WORK/report.md"
log "report written to $OUT"
