#!/usr/bin/env bash
# Install what iampool's tests and benchmarks need on Debian 12. Idempotent; fast when all is there.
#
# Installs: PostgreSQL 15 server and client (the test harness starts throwaway clusters),
# pgbouncer (benchmark baseline), python3, libpam-modules (pam_exec for the IAM-checking
# PostgreSQL), openssl, prometheus (promtool and the scrape test; its service is not started),
# procps (pgrep) and util-linux (setpriv, runuser). Creates OS user `postgres` if missing.
#
#   scripts/setup.sh --run   only what scripts/run-local.sh needs (PostgreSQL, psql, openssl,
#                            python3 and pam_exec for the IAM check, setpriv): no pgbouncer,
#                            prometheus or driver test tools.
set -euo pipefail

RUN_ONLY=0
[[ ${1:-} == --run ]] && RUN_ONLY=1

PACKAGES=(
  postgresql-15
  postgresql-client-15
  python3
  libpam-modules
  openssl
  util-linux
  ca-certificates
)
TOOLS=(/usr/lib/postgresql/15/bin/initdb /usr/lib/postgresql/15/bin/postgres psql openssl python3
  setpriv)
if [[ $RUN_ONLY -eq 0 ]]; then
  PACKAGES+=(pgbouncer prometheus procps)
  TOOLS+=(/usr/sbin/pgbouncer promtool pgrep)
fi

log() { printf 'setup: %s\n' "$*" >&2; }

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
need_user=0
id -u postgres >/dev/null 2>&1 || need_user=1

base_ready=0
if [[ ${#missing[@]} -eq 0 && $need_user -eq 0 ]]; then
  log "all packages present, OS user postgres exists"
  base_ready=1
fi

# The install steps run only when something is missing; the driver block below always runs.
if [[ $base_ready -eq 0 ]]; then

# Run privileged steps as root, through sudo when we are not root.
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    log "not root and no passwordless sudo; please install as root:"
    [[ ${#missing[@]} -gt 0 ]] && log "  apt-get install -y --no-install-recommends ${missing[*]}"
    [[ $need_user -eq 1 ]] && log "  adduser --system --group --home /var/lib/postgresql postgres"
    exit 1
  fi
fi

if [[ ${#missing[@]} -gt 0 ]]; then
  log "installing: ${missing[*]}"
  # Keep package scripts from starting services (prometheus, pgbouncer, a PostgreSQL main
  # cluster): policy-rc.d exit 101 = "action forbidden" for invoke-rc.d.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    own_policy=1
  fi
  restore_policy() { [[ $own_policy -eq 1 ]] && "${SUDO[@]}" rm -f "$policy"; return 0; }
  trap restore_policy EXIT
  running_before=$(pg_lsclusters -h 2>/dev/null | awk '$4 == "online" {print $1 "/" $2}' || true)

  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -q
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"

  # Without systemd-aware policy some installs still start things; stop what we started.
  if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters -h 2>/dev/null | awk '$4 == "online" {print $1 " " $2}' |
      while read -r ver name; do
        if ! grep -qx "$ver/$name" <<<"$running_before"; then
          log "stopping PostgreSQL cluster $ver/$name started by the package install"
          "${SUDO[@]}" pg_ctlcluster "$ver" "$name" stop || true
        fi
      done
  fi
  for svc in prometheus prometheus-node-exporter pgbouncer; do
    if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
      "${SUDO[@]}" systemctl disable --now "$svc" >/dev/null 2>&1 || true
    elif pgrep -x "$svc" >/dev/null 2>&1; then
      "${SUDO[@]}" service "$svc" stop >/dev/null 2>&1 || true
    fi
  done
fi

if ! id -u postgres >/dev/null 2>&1; then
  log "creating OS user postgres"
  "${SUDO[@]}" adduser --system --group --home /var/lib/postgresql --no-create-home \
    --shell /bin/bash postgres
fi

for tool in "${TOOLS[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || { log "still missing after install: $tool"; exit 1; }
done
log "done"
fi

# --- driver test prerequisites (drivers.rs) ---
# The real client drivers that tests/it/drivers.rs runs through iampool: asyncpg and psycopg 3
# in a venv at target/driver-venv (pins in tests/drivers/requirements.txt), node-postgres from
# tests/drivers/package-lock.json via `npm ci` into target/driver-node (under target/ so that
# node_modules never shows up as untracked files), and pgjdbc plus a JDK from Debian. Each step
# is skipped when a stamp shows its inputs are already installed.
driver_prerequisites() {
  local root drivers venv node_dir stamp want
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  drivers=$root/tests/drivers
  venv=$root/target/driver-venv
  node_dir=$root/target/driver-node

  local apt_missing=()
  [[ -f /usr/share/java/postgresql.jar ]] || apt_missing+=(libpostgresql-jdbc-java)
  { command -v java && command -v javac; } >/dev/null 2>&1 || apt_missing+=(default-jdk-headless)
  command -v npm >/dev/null 2>&1 || apt_missing+=(nodejs npm)
  /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_missing+=(python3-venv)
  if [[ ${#apt_missing[@]} -gt 0 ]]; then
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
      if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
      else
        log "not root and no passwordless sudo; please run as root:"
        log "  apt-get install -y --no-install-recommends ${apt_missing[*]}"
        return 1
      fi
    fi
    log "installing driver test packages: ${apt_missing[*]}"
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      "${apt_missing[@]}"
  fi

  want=$(sha256sum "$drivers/requirements.txt" | cut -d' ' -f1)
  stamp=$venv/.iampool-requirements
  if [[ ! -x $venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    log "installing Python drivers into $venv"
    mkdir -p "$root/target"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$drivers/requirements.txt"
    echo "$want" >"$stamp"
  fi

  want=$(cat "$drivers/package.json" "$drivers/package-lock.json" | sha256sum | cut -d' ' -f1)
  stamp=$node_dir/.iampool-lock
  if [[ ! -d $node_dir/node_modules/pg || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    log "installing node-postgres into $node_dir"
    mkdir -p "$node_dir"
    cp "$drivers/package.json" "$drivers/package-lock.json" "$node_dir/"
    (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" >"$stamp"
  fi
  log "driver test prerequisites present"
}
[[ $RUN_ONLY -eq 1 ]] || driver_prerequisites
