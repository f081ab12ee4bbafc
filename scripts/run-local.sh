#!/usr/bin/env bash
# Run iampool locally in front of a throwaway PostgreSQL 15 (removed again on exit).
#
#   scripts/run-local.sh [--mode iam|plain] [-- extra iampool flags...]
#
# Modes: iam (default) = an RDS-like upstream: TLS for a fake RDS host name from a test CA,
#          IAM user `app` (GRANT rds_iam) checked by PAM with tests/support/rds_iam_verifier.py;
#          iampool signs in with auth=iam and static test keys, clients with trust. Needs root.
#        plain = password (SCRAM) upstream, user `app`, database `app`.
# IAMPOOL_* environment variables reach iampool as usual; IAMPOOL_LISTEN replaces the
# default --listen 127.0.0.1:6432. IAMPOOL_PG_BINDIR picks other PostgreSQL binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=iam
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
  iam | plain) ;;
  *) echo "run-local: unknown mode '$MODE' (known: iam, plain)" >&2; exit 2 ;;
esac
if [[ $MODE == iam && $(id -u) -ne 0 ]]; then
  echo "run-local: --mode iam writes a PAM service to /etc/pam.d and needs root;" \
    "use --mode plain otherwise" >&2
  exit 2
fi

log() { printf 'run-local: %s\n' "$*" >&2; }

scripts/setup.sh --run
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
# Set by setup_MODE: environment only iampool gets, and the client URL without a password.
IAMPOOL_ENV=()
CLIENT_PW=
PAM_FILE=

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
  [[ -n $PAM_FILE ]] && rm -f "$PAM_FILE"
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
  CLIENT_PW=":$APP_PW"
}

# A mode = prepare_MODE (before initdb: mode_hba, mode_conf) + setup_MODE (roles, UPSTREAM).
prepare_plain() { :; }

# iam: what RDS does for an IAM user, on this machine.
RDS_HOST=mydb.cluster-iampoollocal.us-east-1.rds.amazonaws.com
RDS_REGION=us-east-1
# Static test keys, known to the verifier; they reach iampool's environment only.
TEST_ACCESS_KEY_ID=AKIAIAMPOOLLOCAL0001
TEST_SECRET_ACCESS_KEY=iampool/run-local/static+secret/000000000
PAM_SERVICE=iampool_local_$$

prepare_iam() {
  local tls=$WORK/tls pam=$WORK/pam
  mkdir -p "$tls" "$pam"
  # A test CA and a server certificate for the fake RDS name (what sslrootcert verifies).
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=iampool run-local CA" -keyout "$tls/ca.key" -out "$tls/ca.pem" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$RDS_HOST" \
    -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n' \
    "$RDS_HOST" >"$tls/server.ext"
  openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
    -CAcreateserial -days 2 -extfile "$tls/server.ext" -out "$tls/server.crt" 2>/dev/null
  rm -f "$tls/ca.key" "$tls/server.csr" "$tls/server.ext" "$tls"/*.srl
  chmod 0644 "$tls/ca.pem" "$tls/server.crt"
  chmod 0600 "$tls/server.key"
  # The PAM module runs the verifier as the server's OS user: it must read these files.
  cp tests/support/rds_iam_verifier.py "$pam/rds_iam_verifier.py"
  printf '{"%s": {"secret": "%s"}}\n' "$TEST_ACCESS_KEY_ID" "$TEST_SECRET_ACCESS_KEY" >"$pam/keys.json"
  : >"$pam/verifier.log"
  chmod 0755 "$pam"
  chmod 0644 "$pam"/*
  chown -R postgres:postgres "$tls" "$pam"
  mode_hba="hostssl all +rds_iam 127.0.0.1/32 pam pamservice=$PAM_SERVICE
host all +rds_iam 127.0.0.1/32 reject"
  mode_conf="ssl = on
ssl_cert_file = '$tls/server.crt'
ssl_key_file = '$tls/server.key'"
}

setup_iam() {
  APP_USER=app
  APP_DB=app
  psql_super -v user="$APP_USER" -v db="$APP_DB" <<'EOF'
CREATE ROLE rds_iam NOLOGIN;
CREATE USER :"user";
GRANT rds_iam TO :"user";
CREATE DATABASE :"db" OWNER :"user";
EOF
  local pam=$WORK/pam python=/usr/bin/python3
  [[ -x $python ]] || python=$(command -v python3)
  # Written now that the port is known: the verifier checks the token's HOST:PORT.
  PAM_FILE=/etc/pam.d/$PAM_SERVICE
  cat >"$PAM_FILE" <<EOF
# iampool scripts/run-local.sh --mode iam (removed on exit)
auth required pam_exec.so expose_authtok quiet $python $pam/rds_iam_verifier.py --keys $pam/keys.json --region $RDS_REGION --host $RDS_HOST --port $PORT --log $pam/verifier.log
account required pam_permit.so
EOF
  UPSTREAM="postgres://$APP_USER@$RDS_HOST:$PORT/$APP_DB?auth=iam&region=$RDS_REGION&hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert=$WORK/tls/ca.pem"
  IAMPOOL_ENV=(
    "AWS_ACCESS_KEY_ID=$TEST_ACCESS_KEY_ID"
    "AWS_SECRET_ACCESS_KEY=$TEST_SECRET_ACCESS_KEY"
    AWS_EC2_METADATA_DISABLED=true
    "IAMPOOL_AUTH_TYPE=${IAMPOOL_AUTH_TYPE:-trust}"
  )
  CLIENT_PW=
  log "IAM logins are checked by PAM service $PAM_SERVICE; verifier log: $pam/verifier.log"
}

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

  DATABASE_URL=postgres://$APP_USER$CLIENT_PW@$LISTEN/$APP_DB
  psql 'postgres://$APP_USER$CLIENT_PW@$LISTEN/$APP_DB' -c 'select 1'

  iampool listens on $LISTEN (elsewhere: IAMPOOL_LISTEN=127.0.0.1:7432 $0);
  PostgreSQL took the free port $PORT. Ctrl-C drains and stops both (a second Ctrl-C: at once).

EOF

# In the background so the traps below run at once, and in its own session (setsid) so a
# terminal's Ctrl-C reaches only this script, which passes it on as one TERM: iampool drains.
# (Otherwise tokio's SIGINT handler sees the group's SIGINT as well, takes the forwarded TERM
# for a second signal and exits at once.) A second Ctrl-C is a second TERM: exit at once.
# iampool's exit ends the script, and the EXIT trap stops PostgreSQL and removes $WORK.
env "${IAMPOOL_ENV[@]}" setsid "$BIN" --upstream "$UPSTREAM" "${LISTEN_ARGS[@]}" "${EXTRA_ARGS[@]}" &
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
