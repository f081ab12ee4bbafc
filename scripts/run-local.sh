#!/usr/bin/env bash
# Run iampool locally in front of a throwaway PostgreSQL 15 (removed again on exit).
#
#   scripts/run-local.sh [--mode plain] [-- extra iampool flags...]
#
# Modes: plain = password (SCRAM) upstream, user `app`, database `app`.
# IAMPOOL_* environment variables reach iampool as usual; IAMPOOL_LISTEN replaces the
# default --listen 127.0.0.1:6432. IAMPOOL_PG_BINDIR picks other PostgreSQL binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=plain
while [[ $# -gt 0 ]]; do
  case $1 in
    --mode) MODE=${2:?--mode needs a value}; shift 2 ;;
    --mode=*) MODE=${1#*=}; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
EXTRA_ARGS=("$@")
case $MODE in
  plain) ;;
  *) echo "run-local: unknown mode '$MODE' (known: plain)" >&2; exit 2 ;;
esac

log() { printf 'run-local: %s\n' "$*" >&2; }

scripts/setup.sh
cargo build --release --locked
BIN=target/release/iampool

PG_BIN=${IAMPOOL_PG_BINDIR:-/usr/lib/postgresql/15/bin}
WORK=$(mktemp -d /tmp/iampool-local-XXXXXX)
DATA=$WORK/data
PG_LOG=$WORK/postgres.log
PORT=
# Per-mode additions to pg_hba.conf (placed first) and postgresql.conf, set by prepare_MODE.
mode_hba=
mode_conf=

# PostgreSQL refuses to run as root: as root, its files and processes belong to `postgres`.
if [[ $(id -u) -eq 0 ]]; then
  chown postgres:postgres "$WORK"
  as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
else
  as_pg() { "$@"; }
fi

stop_postgres() {
  if [[ -f $DATA/postmaster.pid ]]; then
    as_pg "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w -t 20 stop >/dev/null 2>&1 ||
      as_pg "$PG_BIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
  fi
}
cleanup() {
  stop_postgres
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

init_cluster() {
  local pwfile=$WORK/pwfile
  SUPER_PW=$(openssl rand -hex 16)
  echo "$SUPER_PW" >"$pwfile"
  [[ $(id -u) -eq 0 ]] && chown postgres:postgres "$pwfile"
  as_pg "$PG_BIN/initdb" -D "$DATA" -U postgres --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C --no-sync \
    --no-instructions >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log" >&2; exit 1; }
  rm -f "$pwfile"
  as_pg tee "$DATA/pg_hba.conf" >/dev/null <<EOF
${mode_hba}
local all postgres trust
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
EOF
  echo "include 'iampool_local.conf'" | as_pg tee -a "$DATA/postgresql.conf" >/dev/null
}

# Our settings live in their own file so a port retry rewrites only this.
write_conf() {
  as_pg tee "$DATA/iampool_local.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$WORK'
max_connections = 200
password_encryption = 'scram-sha-256'
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
${mode_conf}
EOF
}

start_postgres() {
  local try
  for try in 1 2 3 4 5; do
    PORT=$(free_port)
    write_conf
    # setsid: a terminal's Ctrl-C reaches iampool, not PostgreSQL; cleanup stops it in order.
    if as_pg setsid -w "$PG_BIN/pg_ctl" -D "$DATA" -l "$PG_LOG" -w -t 30 start >/dev/null; then
      return 0
    fi
    grep -q 'could not create any TCP/IP sockets' "$PG_LOG" 2>/dev/null || break
    log "port $PORT was taken, trying another"
  done
  log "PostgreSQL did not start; log tail:"
  tail -n 30 "$PG_LOG" >&2 || true
  exit 1
}

psql_super() {
  psql -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PORT" -U postgres -d postgres "$@"
}

setup_plain() {
  APP_USER=app
  APP_DB=app
  APP_PW=$(openssl rand -hex 16)
  psql_super -v user="$APP_USER" -v pw="$APP_PW" -v db="$APP_DB" <<'EOF'
CREATE ROLE :"user" LOGIN PASSWORD :'pw';
CREATE DATABASE :"db" OWNER :"user";
EOF
  UPSTREAM="postgres://$APP_USER:$APP_PW@127.0.0.1:$PORT/$APP_DB?sslmode=disable"
}

# A mode = prepare_MODE (before initdb: mode_hba, mode_conf) + setup_MODE (roles, UPSTREAM).
prepare_plain() { :; }

"prepare_$MODE"
init_cluster
start_postgres
"setup_$MODE"
log "PostgreSQL 15 ($MODE) on 127.0.0.1:$PORT, data in $DATA, log $PG_LOG"

LISTEN_ARGS=()
if [[ -z ${IAMPOOL_LISTEN:-} ]]; then
  LISTEN_ARGS=(--listen 127.0.0.1:6432)
fi
LISTEN=${IAMPOOL_LISTEN:-127.0.0.1:6432}
LISTEN=${LISTEN%%,*}

cat <<EOF

  DATABASE_URL=postgres://$APP_USER:$APP_PW@$LISTEN/$APP_DB
  psql 'postgres://$APP_USER:$APP_PW@$LISTEN/$APP_DB' -c 'select 1'

EOF

# In the background so the traps below run at once: a TERM to this script, or Ctrl-C (which
# reaches only this script, since background jobs ignore SIGINT), is passed to iampool as TERM.
# iampool's exit then ends the script, and the EXIT trap stops PostgreSQL and removes $WORK.
"$BIN" --upstream "$UPSTREAM" "${LISTEN_ARGS[@]}" "${EXTRA_ARGS[@]}" &
IAMPOOL_PID=$!
trap 'kill -TERM "$IAMPOOL_PID" 2>/dev/null || true' INT TERM
wait "$IAMPOOL_PID" && rc=0 || rc=$?
# Above 128 may only mean a trapped signal cut the wait short: wait again for the real
# status, until bash says the job is gone (127) and the last status was the real one.
while ((rc > 128)); do
  wait "$IAMPOOL_PID" && next=0 || next=$?
  ((next == 127)) && break
  rc=$next
done
log "iampool exited ($rc); stopping PostgreSQL"
exit "$rc"
