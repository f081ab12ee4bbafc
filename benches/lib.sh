# shellcheck shell=bash
# Shared by benches/compare.sh and benches/callgrind.sh: a throwaway PostgreSQL 15, the systems
# under test (direct, PgBouncer builds, PgDog, iampool), their configs, start/stop, /proc samples.
# Sourced, not run. The caller sets BENCH_NAME, POOL_SIZE, MAX_CLIENT_CONN, SCALE before
# bench_init, and calls bench_init once (it sets the EXIT trap).

PG_BIN=/usr/lib/postgresql/15/bin
# shellcheck disable=SC2034 # used by the scripts that source this
CLK_TCK=$(getconf CLK_TCK)

log() { printf '%s: %s\n' "${BENCH_NAME:-bench}" "$*" >&2; }
die() { log "$*"; exit 1; }

# PostgreSQL and PgBouncer refuse to run as root: as root they run as OS user postgres.
# setpriv (not runuser) so that PAM does not reset the open-files limit raised here.
if [[ $(id -u) -eq 0 ]]; then
  AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
else
  AS_PG=()
fi
as_pg() { "${AS_PG[@]}" "$@"; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_ready PORT [TRIES]: bounded wait until user bench can run a query at 127.0.0.1:PORT.
wait_ready() {
  local port=$1 tries=${2:-60}
  for _ in $(seq "$tries"); do
    if PGCONNECT_TIMEOUT=2 psql -X -q -At -h 127.0.0.1 -p "$port" -U bench -d bench \
      -c 'select 1' >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  return 1
}

# cpu_ticks PID: "utime stime" in clock ticks, all threads, from /proc/PID/stat (fields 14, 15;
# parsed after the last ')' since the command name may hold spaces).
cpu_ticks() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo "- -"; return; }
  stat=${stat##*) }
  # shellcheck disable=SC2086
  set -- $stat
  echo "${12} ${13}"
}

# rss_kib PID: VmRSS in KiB from /proc/PID/status.
rss_kib() { awk '$1 == "VmRSS:" {print $2}' "/proc/$1/status" 2>/dev/null || echo -; }

# ---------------------------------------------------------------- systems
# SYSTEMS: names in the order given; KIND[name] = direct|pgbouncer|pgdog|iampool;
# BIN[name]; PORT[name]; VERSION[name]; SPID[name] = pid of the running pooler ("" when stopped).
SYSTEMS=()
declare -A KIND BIN PORT VERSION SPID CONFDIR THREADS
EVENTS=()

add_system() {
  local kind=$1 bin=${2:-} name version
  case $kind in
    direct) name=direct; version= ;;
    pgbouncer)
      [[ -x $bin ]] || die "PgBouncer binary '$bin' is not executable"
      version=$("$bin" --version 2>/dev/null | awk 'NR == 1 {print $2}')
      [[ -n $version ]] || die "'$bin --version' printed no version"
      name=pgbouncer-$version ;;
    pgdog)
      [[ -x $bin ]] || die "PgDog binary '$bin' is not executable"
      version=$("$bin" --version 2>/dev/null | head -n 1 | awk '{print $NF}')
      name=pgdog ;;
    iampool)
      [[ -x $bin ]] || die "iampool binary '$bin' is not executable"
      version=$("$bin" --version 2>/dev/null | awk '{print $NF}')
      name=iampool ;;
    *) die "unknown system kind $kind" ;;
  esac
  local base=$name n=2
  while [[ -n ${KIND[$name]:-} ]]; do name=$base-$n; n=$((n + 1)); done
  SYSTEMS+=("$name")
  KIND[$name]=$kind
  BIN[$name]=$bin
  VERSION[$name]=${version:-unknown}
  SPID[$name]=
}

# add_iampools BIN: iampool once per value in BENCH_IAMPOOL_THREADS (its worker_threads
# setting: 0 = one per core, 1 = single-threaded); one value (or none) adds plain "iampool".
add_iampools() {
  local bin=$1 t
  read -r -a threads <<<"${BENCH_IAMPOOL_THREADS:-}"
  if ((${#threads[@]} <= 1)); then
    add_system iampool "$bin"
    [[ ${#threads[@]} -eq 1 ]] && THREADS[iampool]=${threads[0]}
    return 0
  fi
  for t in "${threads[@]}"; do
    [[ $t =~ ^[0-9]+$ ]] || die "BENCH_IAMPOOL_THREADS values are thread counts (got '$t')"
    add_system iampool "$bin"
    local name=${SYSTEMS[-1]}
    unset 'KIND[$name]'
    SYSTEMS[-1]=iampool-t$t
    KIND[iampool-t$t]=iampool
    BIN[iampool-t$t]=$bin
    VERSION[iampool-t$t]=${VERSION[$name]}
    SPID[iampool-t$t]=
    THREADS[iampool-t$t]=$t
  done
}

poolers() { local s; for s in "${SYSTEMS[@]}"; do [[ ${KIND[$s]} == direct ]] || echo "$s"; done; }

# configure_system NAME: picks a port and writes the pooler's config under $WORK/NAME.
# Client auth is md5 for every pooler (cheap per login, so logins barely show in CPU per
# transaction); poolers log in to PostgreSQL with SCRAM using the same plaintext password.
configure_system() {
  local s=$1 dir=$WORK/$1
  if [[ ${KIND[$s]} == direct ]]; then PORT[$s]=$PG_PORT; return; fi
  PORT[$s]=$(free_port)
  mkdir -p "$dir"
  CONFDIR[$s]=$dir
  case ${KIND[$s]} in
    pgbouncer)
      local prepared="max_prepared_statements = 200"
      if [[ $(printf '%s\n1.21\n' "${VERSION[$s]}" | sort -V | head -n 1) != 1.21 ]]; then
        prepared="; max_prepared_statements needs PgBouncer >= 1.21; this is ${VERSION[$s]}"
      fi
      printf '"bench" "%s"\n' "$PW" >"$dir/userlist.txt"
      cat >"$dir/pgbouncer.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = ${PORT[$s]}
unix_socket_dir =
auth_type = md5
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = $MAX_CLIENT_CONN
server_idle_timeout = 600
$prepared
logfile = $dir/pgbouncer.log
EOF
      ;;
    pgdog)
      cat >"$dir/pgdog.toml" <<EOF
[general]
host = "127.0.0.1"
port = ${PORT[$s]}
pooler_mode = "transaction"
default_pool_size = $POOL_SIZE
min_pool_size = 0
auth_type = "md5"
prepared_statements = "extended"
idle_timeout = 600000
checkout_timeout = 120000

[[databases]]
name = "bench"
host = "127.0.0.1"
port = $PG_PORT
database_name = "bench"
EOF
      cat >"$dir/users.toml" <<EOF
[[users]]
name = "bench"
database = "bench"
password = "$PW"
EOF
      ;;
    iampool)
      # The whole configuration is these flags (IAMPOOL_* variables were unset by the caller).
      printf '%s\n' --upstream "postgres://bench:$PW@127.0.0.1:$PG_PORT/bench?sslmode=disable" \
        --listen "127.0.0.1:${PORT[$s]}" --pool-size "$POOL_SIZE" --auth-type md5 \
        --max-client-conn "$MAX_CLIENT_CONN" ${THREADS[$s]:+--worker-threads "${THREADS[$s]}"} \
        >"$dir/iampool.args"
      ;;
  esac
  [[ $(id -u) -eq 0 ]] && chown -R postgres:postgres "$dir"
  return 0
}

# The command line that runs pooler NAME in the foreground.
system_command() {
  local s=$1 dir=${CONFDIR[$1]}
  case ${KIND[$s]} in
    pgbouncer) CMD=("${AS_PG[@]}" "${BIN[$s]}" "$dir/pgbouncer.ini") ;;
    pgdog) CMD=("${BIN[$s]}" --config "$dir/pgdog.toml" --users "$dir/users.toml") ;;
    iampool) mapfile -t CMD <"$dir/iampool.args"; CMD=("${BIN[$s]}" "${CMD[@]}") ;;
  esac
}

# Printable config of NAME, password replaced by PASSWORD.
show_config() {
  local s=$1 dir=${CONFDIR[$1]:-}
  case ${KIND[$s]} in
    pgbouncer) sed "s/$PW/PASSWORD/g" "$dir/pgbouncer.ini" ;;
    pgdog) { echo "# pgdog.toml"; cat "$dir/pgdog.toml"; echo "# users.toml"; cat "$dir/users.toml"; } |
      sed "s/$PW/PASSWORD/g" ;;
    iampool) system_command "$s"; printf '%q ' "${CMD[@]}" | sed "s/$PW/PASSWORD/g"; echo ;;
  esac
}

# start_system NAME [WRAPPER...]: starts the pooler (under WRAPPER, e.g. valgrind) and waits
# until it answers (TRIES half-seconds, $START_TRIES, default 60).
start_system() {
  local s=$1; shift
  [[ ${KIND[$s]} == direct ]] && return 0
  system_command "$s"
  local dir=${CONFDIR[$s]}
  if [[ ${KIND[$s]} == pgbouncer && $# -gt 0 ]]; then
    # The wrapper runs as postgres too: AS_PG goes first.
    CMD=("${AS_PG[@]}" "$@" "${CMD[@]:${#AS_PG[@]}}")
  else
    CMD=("$@" "${CMD[@]}")
  fi
  (cd "$dir" && exec "${CMD[@]}") >>"$dir/stdout.log" 2>&1 &
  SPID[$s]=$!
  if ! wait_ready "${PORT[$s]}" "${START_TRIES:-60}"; then
    tail_log "$s" >&2
    die "$s does not answer on port ${PORT[$s]}"
  fi
}

tail_log() {
  local s=$1 dir=${CONFDIR[$1]}
  { tail -n 5 "$dir/pgbouncer.log" 2>/dev/null || true; tail -n 5 "$dir/stdout.log" 2>/dev/null || true; } |
    sed 's/\x1b\[[0-9;]*m//g'
}

alive() { [[ ${KIND[$1]} == direct ]] || { [[ -n ${SPID[$1]} ]] && kill -0 "${SPID[$1]}" 2>/dev/null; }; }

# stop_system NAME [GRACE_SECONDS]: SIGTERM, then SIGINT halfway, then SIGKILL after GRACE (10).
stop_system() {
  local s=$1 grace=${2:-10} pid=${SPID[$1]:-} i
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    if ((i == grace * 5)); then kill -INT "$pid" 2>/dev/null || true; fi
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  SPID[$s]=
}

# ensure_up NAME WHEN: restarts a pooler that has exited (crash, or a signal from outside on a
# shared machine), recording it in EVENTS. Returns 1 when it had to restart.
ensure_up() {
  local s=$1 when=$2 status=0 lines
  alive "$s" && return 0
  [[ -n ${SPID[$s]} ]] && { wait "${SPID[$s]}" 2>/dev/null || status=$?; }
  lines=$(tail_log "$s" | tail -n 3 | tr '\n|' ' /' | cut -c 1-400)
  EVENTS+=("$s exited $when (exit status $status), restarted. Log tail: \`$lines\`")
  log "$s exited $when (status $status); restarting"
  SPID[$s]=
  start_system "$s"
  return 1
}

# ---------------------------------------------------------------- PostgreSQL
# pg_start MAX_CONNECTIONS: initdb + start in $WORK/data, role and database bench, pgbench -i.
pg_start() {
  local max=$1
  log "starting PostgreSQL 15 (fsync=off, max_connections=$max)"
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
max_connections = $max
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
}

# What pgbench does before a run unless -n, done here directly so that it is not a pooler's work.
pg_vacuum() {
  psql -X -q -h "$WORK" -p "$PG_PORT" -U postgres -d bench \
    -c 'VACUUM pgbench_branches' -c 'VACUUM pgbench_tellers' -c 'TRUNCATE pgbench_history' \
    >/dev/null 2>&1 || log "vacuum before the run failed (ignored)"
}

# ---------------------------------------------------------------- setup and cleanup
bench_cleanup() {
  local rc=$? s
  trap - EXIT INT TERM
  [[ -n ${IDLE_PID:-} ]] && kill -KILL "$IDLE_PID" 2>/dev/null
  for s in "${SYSTEMS[@]}"; do stop_system "$s" "${STOP_GRACE:-10}"; done
  if [[ -n ${WORK:-} && -f $WORK/data/postmaster.pid ]]; then
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m fast -w -t 20 stop >/dev/null 2>&1 ||
      as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m immediate -w -t 20 stop >/dev/null 2>&1 || true
  fi
  if [[ -n ${WORK:-} && -z ${BENCH_KEEP_WORK:-} ]]; then rm -rf "$WORK"
  elif [[ -n ${WORK:-} ]]; then log "kept $WORK"; fi
  exit "$rc"
}

bench_init() {
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local name
  # iampool treats every IAMPOOL_* variable as configuration and rejects unknown ones: none of
  # the caller's reaches any system started here.
  while read -r name; do
    log "ignoring $name from the environment"
    unset "$name"
  done < <(compgen -e | grep '^IAMPOOL_' || true)
  WORK=$(mktemp -d /tmp/iampool-bench-XXXXXX)
  chmod 755 "$WORK"
  [[ $(id -u) -eq 0 ]] && chown postgres:postgres "$WORK"
  PW=$(openssl rand -hex 16)
  export PGPASSWORD=$PW PGSSLMODE=disable
}

# find_iampool: sets IAMPOOL_BIN from BENCH_IAMPOOL, or builds it (release, --locked).
find_iampool() {
  if [[ -n ${BENCH_IAMPOOL:-} ]]; then
    IAMPOOL_BIN=$BENCH_IAMPOOL
  else
    log "building iampool (cargo build --release --locked)"
    cargo build --release --locked >&2
    IAMPOOL_BIN=${CARGO_TARGET_DIR:-target}/release/iampool
  fi
  [[ -x $IAMPOOL_BIN ]] || die "iampool binary $IAMPOOL_BIN not found"
  IAMPOOL_BIN=$(realpath "$IAMPOOL_BIN")
}

# add_peers: PgBouncer (PGBOUNCER, default Debian's; "none" skips), PGBOUNCER_EXTRA (paths
# separated by spaces, colons or commas), PgDog (PGDOG).
add_peers() {
  local p
  if [[ ${PGBOUNCER:-/usr/sbin/pgbouncer} != none ]]; then add_system pgbouncer "${PGBOUNCER:-/usr/sbin/pgbouncer}"; fi
  local extra=${PGBOUNCER_EXTRA:-}
  for p in ${extra//[:,]/ }; do add_system pgbouncer "$p"; done
  if [[ -n ${PGDOG:-} ]]; then add_system pgdog "$PGDOG"; fi
}

iampool_commit() {
  local commit
  commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
  if [[ -n $(git --no-optional-locks status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    commit="$commit (with uncommitted changes)"
  fi
  echo "$commit"
}
