#!/usr/bin/env bash
# pgbench side by side, in one run: direct PostgreSQL 15, PgBouncer, iampool.
#
#   benches/compare.sh            # as root on Debian 12 (installs what is missing via scripts/setup.sh)
#
# Environment: BENCH_CLIENTS (50), BENCH_SECONDS (15), BENCH_THREADS (2), BENCH_SCALE (10),
# BENCH_POOL_SIZE (10), BENCH_MODES ("simple extended prepared"), BENCH_OUT (results file;
# default benches/results-<date>.md). Prints a Markdown report and writes it to the results file.
# Everything it starts (PostgreSQL, PgBouncer, iampool) and its temp dir are removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${BENCH_CLIENTS:-50}
SECONDS_PER_RUN=${BENCH_SECONDS:-15}
THREADS=${BENCH_THREADS:-2}
SCALE=${BENCH_SCALE:-10}
POOL_SIZE=${BENCH_POOL_SIZE:-10}
read -r -a MODES <<<"${BENCH_MODES:-simple extended prepared}"
OUT=${BENCH_OUT:-benches/results-$(date -u +%Y-%m-%d-%H%M%S).md}
TARGETS=(direct pgbouncer iampool)
PG_BIN=/usr/lib/postgresql/15/bin
PGBOUNCER=/usr/sbin/pgbouncer
BIN=target/release/iampool

log() { printf 'compare: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

for n in "$CLIENTS" "$SECONDS_PER_RUN" "$THREADS" "$SCALE" "$POOL_SIZE"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "BENCH_* values must be positive integers (got '$n')"
done
for m in "${MODES[@]}"; do
  [[ $m =~ ^(simple|extended|prepared)$ ]] || die "unknown pgbench mode '$m' in BENCH_MODES"
done
# PostgreSQL keeps 3 slots for superusers; both poolers may hold POOL_SIZE server
# connections each while the direct runs go on, plus a few for psql.
MAX_CONNECTIONS=300
DIRECT_CLIENTS=$((CLIENTS < MAX_CONNECTIONS - 3 - 2 * POOL_SIZE - 7 ? CLIENTS : MAX_CONNECTIONS - 3 - 2 * POOL_SIZE - 7))
# A run that hangs (a pooler that stops answering) is cut off this long after its -T.
RUN_GRACE=$((30 + CLIENTS / 20))
((THREADS <= DIRECT_CLIENTS)) || THREADS=$DIRECT_CLIENTS

WORK=
IAMPOOL_PID=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $IAMPOOL_PID ]] && kill -0 "$IAMPOOL_PID" 2>/dev/null; then
    kill -TERM "$IAMPOOL_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$IAMPOOL_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$IAMPOOL_PID" 2>/dev/null || true
    wait "$IAMPOOL_PID" 2>/dev/null || true
  fi
  if [[ -n $WORK && -f $WORK/pgbouncer.pid ]]; then
    local bpid
    bpid=$(cat "$WORK/pgbouncer.pid" 2>/dev/null || true)
    if [[ $bpid =~ ^[0-9]+$ ]]; then
      kill -TERM "$bpid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$bpid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$bpid" 2>/dev/null || true
    fi
  fi
  if [[ -n $WORK && -f $WORK/data/postmaster.pid ]]; then
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m fast -w -t 20 stop >/dev/null 2>&1 ||
      as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m immediate -w -t 20 stop >/dev/null 2>&1 || true
  fi
  [[ -n $WORK ]] && rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# PostgreSQL and PgBouncer refuse to run as root: as root they run as OS user postgres.
if [[ $(id -u) -eq 0 ]]; then
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits (bounded) until user bench can run a query at 127.0.0.1:$1.
wait_ready() {
  local port=$1
  for _ in $(seq 60); do
    if PGCONNECT_TIMEOUT=2 psql -X -q -At -h 127.0.0.1 -p "$port" -U bench -d bench \
      -c 'select 1' >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  return 1
}

# ---------------------------------------------------------------- build and tools
scripts/setup.sh
log "building iampool (release)"
cargo build --release --locked
[[ -x $BIN ]] || die "$BIN was not built"
ulimit -n 8192 2>/dev/null || true

WORK=$(mktemp -d /tmp/iampool-bench-XXXXXX)
[[ $(id -u) -eq 0 ]] && chown postgres:postgres "$WORK"
PW=$(openssl rand -hex 16)
export PGPASSWORD=$PW PGSSLMODE=disable

# ---------------------------------------------------------------- PostgreSQL 15
log "starting PostgreSQL 15 (fsync=off)"
as_pg "$PG_BIN/initdb" -D "$WORK/data" -U postgres --auth-local=trust \
  --auth-host=scram-sha-256 -E UTF8 --locale=C --no-sync --no-instructions \
  >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }
echo "include 'bench.conf'" | as_pg tee -a "$WORK/data/postgresql.conf" >/dev/null
PG_PORT=
for _ in 1 2 3 4 5; do
  PG_PORT=$(free_port)
  as_pg tee "$WORK/data/bench.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK'
max_connections = $MAX_CONNECTIONS
password_encryption = 'scram-sha-256'
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
EOF
  if as_pg setsid "$PG_BIN/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w -t 60 start \
    >/dev/null 2>&1; then
    break
  fi
  grep -q 'could not create any TCP/IP sockets' "$WORK/postgres.log" 2>/dev/null ||
    { tail -n 30 "$WORK/postgres.log" >&2 || true; die "PostgreSQL did not start"; }
  log "port $PG_PORT was taken, trying another"
done
[[ -f $WORK/data/postmaster.pid ]] || die "PostgreSQL did not start"
psql -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PG_PORT" -U postgres -d postgres \
  -v pw="$PW" <<'EOF'
CREATE ROLE bench LOGIN PASSWORD :'pw';
CREATE DATABASE bench OWNER bench;
EOF
log "pgbench -i -s $SCALE"
timeout 900 pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U bench bench \
  >"$WORK/pgbench-init.log" 2>&1 || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }

# ---------------------------------------------------------------- PgBouncer
BOUNCER_VERSION=$("$PGBOUNCER" --version | awk 'NR == 1 {print $2}')
# max_prepared_statements (protocol-level prepared statements in transaction mode) came in 1.21.
PREPARED_LINE="max_prepared_statements = 200"
if [[ $(printf '%s\n1.21\n' "$BOUNCER_VERSION" | sort -V | head -n 1) != 1.21 ]]; then
  PREPARED_LINE="; max_prepared_statements needs PgBouncer >= 1.21; this is $BOUNCER_VERSION"
  log "PgBouncer $BOUNCER_VERSION has no max_prepared_statements: its -M prepared runs will likely fail"
fi
BOUNCER_PORT=$(free_port)
printf '"bench" "%s"\n' "$PW" | as_pg tee "$WORK/userlist.txt" >/dev/null
as_pg tee "$WORK/pgbouncer.ini" >/dev/null <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 1000
$PREPARED_LINE
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
EOF
start_pgbouncer() {
  as_pg "$PGBOUNCER" -d -q "$WORK/pgbouncer.ini" ||
    { tail -n 20 "$WORK/pgbouncer.log" >&2 || true; die "PgBouncer did not start"; }
  wait_ready "$BOUNCER_PORT" ||
    { tail -n 20 "$WORK/pgbouncer.log" >&2 || true; die "PgBouncer does not answer"; }
}
pgbouncer_alive() {
  local bpid
  bpid=$(cat "$WORK/pgbouncer.pid" 2>/dev/null || true)
  [[ $bpid =~ ^[0-9]+$ ]] && kill -0 "$bpid" 2>/dev/null
}
log "starting PgBouncer $BOUNCER_VERSION on port $BOUNCER_PORT"
start_pgbouncer

# ---------------------------------------------------------------- iampool
IAMPOOL_PORT=$(free_port)
log "starting iampool on port $IAMPOOL_PORT"
# Only the flags below configure it: IAMPOOL_* variables from the caller's environment are dropped.
unset_iampool_env=()
while read -r name; do unset_iampool_env+=(-u "$name"); done < <(compgen -e | grep '^IAMPOOL_' || true)
IAMPOOL_HELP=$("$BIN" --help)
IAMPOOL_PREPARED="no max_prepared_statements in this build"
if grep -q -- '--max-prepared-statements' <<<"$IAMPOOL_HELP"; then
  IAMPOOL_PREPARED="max_prepared_statements=$(grep -A 3 -- '--max-prepared-statements' <<<"$IAMPOOL_HELP" |
    tr -s ' \n' ' ' | sed -n 's/.*\[default: \([0-9]*\)\].*/\1/p') (default)"
fi
start_iampool() {
  env "${unset_iampool_env[@]}" \
    "$BIN" --upstream "postgres://bench:$PW@127.0.0.1:$PG_PORT/bench?sslmode=disable" \
    --listen "127.0.0.1:$IAMPOOL_PORT" --pool-size "$POOL_SIZE" >>"$WORK/iampool.log" 2>&1 &
  IAMPOOL_PID=$!
  wait_ready "$IAMPOOL_PORT" ||
    { tail -n 20 "$WORK/iampool.log" >&2 || true; die "iampool does not answer"; }
}
iampool_alive() { kill -0 "$IAMPOOL_PID" 2>/dev/null; }
start_iampool

# A pooler that exits mid-benchmark (a crash, or a signal from outside: the machine is
# shared) is recorded with the last lines of its log, then restarted for the runs left.
EVENTS=()
ensure_up() {
  local target=$1 when=$2 status=0 lines
  case $target in
    direct) return 0 ;;
    iampool)
      iampool_alive && return 0
      wait "$IAMPOOL_PID" 2>/dev/null || status=$?
      lines=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/iampool.log" | tail -n 3 | tr '\n|' ' /' | cut -c 1-400)
      EVENTS+=("iampool exited $when (exit status $status), restarted. Log tail: \`$lines\`")
      log "iampool exited $when (status $status); restarting"
      start_iampool
      ;;
    pgbouncer)
      pgbouncer_alive && return 0
      lines=$(tail -n 3 "$WORK/pgbouncer.log" 2>/dev/null | tr '\n|' ' /' | cut -c 1-400)
      EVENTS+=("PgBouncer exited $when, restarted. Log tail: \`$lines\`")
      log "PgBouncer exited $when; restarting"
      start_pgbouncer
      ;;
  esac
  return 1
}

# ---------------------------------------------------------------- runs
declare -A PORT=([direct]=$PG_PORT [pgbouncer]=$BOUNCER_PORT [iampool]=$IAMPOOL_PORT)
declare -A TPS LAT FAILED DONE NOTE NCLIENTS
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date -u +%FT%TZ)

# One pgbench run; fills TPS/LAT/FAILED/DONE/NOTE for key "$variant/$mode/$target".
run() {
  local variant=$1 mode=$2 target=$3 key="$1/$2/$3" clients=$CLIENTS rc=0
  [[ $target == direct ]] && clients=$DIRECT_CLIENTS
  local args=(-c "$clients" -j "$THREADS" -T "$SECONDS_PER_RUN" -M "$mode")
  [[ $variant == select-only ]] && args+=(-S)
  local out="$WORK/run-${variant}-${mode}-${target}.log"
  ensure_up "$target" "before $key" || true
  log "pgbench ${args[*]} -> $target"
  timeout -k 10 $((SECONDS_PER_RUN + RUN_GRACE)) pgbench "${args[@]}" \
    -h 127.0.0.1 -p "${PORT[$target]}" -U bench bench >"$out" 2>&1 || rc=$?
  if ! ensure_up "$target" "during $key"; then
    ((rc != 0)) || rc=1
    NOTE[$key]="$target exited during this run; "
  fi
  NCLIENTS[$key]=$clients
  TPS[$key]=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$out" | head -n 1)
  LAT[$key]=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$out" | head -n 1)
  FAILED[$key]=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out" | head -n 1)
  DONE[$key]=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -n 1)
  NOTE[$key]=${NOTE[$key]:-}
  if ((rc != 0)) || [[ -z ${TPS[$key]} ]]; then
    local why
    why=$(grep -m 1 -iE 'error|fatal|abort' "$out" | sed 's/^\(pgbench: \)*//' | tr -s ' ' | tr '|' '/' |
      cut -c 1-140 || true)
    ((rc == 124 || rc == 137)) && why="timed out after $((SECONDS_PER_RUN + RUN_GRACE)) s; $why"
    NOTE[$key]="FAILED (exit $rc): ${NOTE[$key]}${why:-no output}"
    log "  ${NOTE[$key]}"
  else
    log "  tps ${TPS[$key]}, latency ${LAT[$key]} ms, failed ${FAILED[$key]:-?}"
  fi
}

VARIANTS=(tpcb select-only)
for variant in "${VARIANTS[@]}"; do
  for mode in "${MODES[@]}"; do
    for target in "${TARGETS[@]}"; do
      run "$variant" "$mode" "$target"
    done
  done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
ok() { [[ -z ${NOTE[$1]} && -n ${TPS[$1]} ]]; }
ratio() {
  if ok "$1" && ok "$2"; then awk -v a="${TPS[$1]}" -v b="${TPS[$2]}" 'BEGIN {printf "%.2f", a / b}'
  else printf 'n/a'; fi
}
cell() { if ok "$1"; then printf '%.0f' "${TPS[$1]}"; else printf 'FAILED'; fi; }

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [[ -n $(git --no-optional-locks status --porcelain --untracked-files=no 2>/dev/null) ]]; then
  commit="$commit (with uncommitted changes)"
fi

report() {
  cat <<EOF
# pgbench: direct PostgreSQL vs PgBouncer vs iampool

Measured $START, one run of \`benches/compare.sh\`: every figure below comes from the same run,
targets interleaved per mode (direct, pgbouncer, iampool), each pgbench run ${SECONDS_PER_RUN} s.

| | |
|---|---|
| CPUs (nproc) | $(nproc) ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)) |
| Kernel | $(uname -sr) |
| Load average before / after | $LOAD_BEFORE / $LOAD_AFTER |
| PostgreSQL | $("$PG_BIN/postgres" --version | sed 's/^postgres (PostgreSQL) //'), fsync=off, synchronous_commit=off, full_page_writes=off, max_connections=$MAX_CONNECTIONS, scram-sha-256 over 127.0.0.1 |
| PgBouncer | $BOUNCER_VERSION, transaction mode, default_pool_size=$POOL_SIZE, max_client_conn=1000, $([[ $PREPARED_LINE == max_* ]] && echo "max_prepared_statements=200" || echo "no max_prepared_statements (needs >= 1.21)") |
| iampool | $commit, transaction mode (default), --pool-size $POOL_SIZE, $IAMPOOL_PREPARED |
| pgbench | $(pgbench --version | sed 's/^pgbench (PostgreSQL) //'), scale $SCALE, -c $CLIENTS (direct: -c $DIRECT_CLIENTS) -j $THREADS -T $SECONDS_PER_RUN |

## Throughput (tps, excluding connection time) and ratios

| workload | -M | direct | pgbouncer | iampool | iampool/pgbouncer | iampool/direct |
|---|---|---:|---:|---:|---:|---:|
EOF
  local v m
  for v in "${VARIANTS[@]}"; do
    for m in "${MODES[@]}"; do
      printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$v" "$m" \
        "$(cell "$v/$m/direct")" "$(cell "$v/$m/pgbouncer")" "$(cell "$v/$m/iampool")" \
        "$(ratio "$v/$m/iampool" "$v/$m/pgbouncer")" "$(ratio "$v/$m/iampool" "$v/$m/direct")"
    done
  done
  cat <<EOF

## Every run

| workload | -M | target | clients | tps | latency avg (ms) | transactions | failed | note |
|---|---|---|---:|---:|---:|---:|---:|---|
EOF
  local t k
  for v in "${VARIANTS[@]}"; do
    for m in "${MODES[@]}"; do
      for t in "${TARGETS[@]}"; do
        k="$v/$m/$t"
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$v" "$m" "$t" \
          "${NCLIENTS[$k]}" "$([[ -n ${TPS[$k]} ]] && printf '%.1f' "${TPS[$k]}" || echo -)" "${LAT[$k]:--}" "${DONE[$k]:--}" \
          "${FAILED[$k]:--}" "${NOTE[$k]:-ok}"
      done
    done
  done
  if ((${#EVENTS[@]} > 0)); then
    printf '\n## Events\n\n'
    printf -- '- %s\n' "${EVENTS[@]}"
  fi
  cat <<EOF

tpcb = pgbench's built-in TPC-B-like transaction (7 statements, BEGIN..END); select-only = \`-S\`
(one SELECT per transaction). "failed" is pgbench's count of failed transactions; a FAILED run
exited non-zero (e.g. clients aborted on an error) and its partial figures are not ratioed.
Loopback only, one shared machine running pgbench, PostgreSQL and the pooler together:
compare the ratios within this report, not its absolute numbers with other machines.
EOF
}

mkdir -p "$(dirname "$OUT")"
report | tee "$OUT"
log "report written to $OUT"
