#!/usr/bin/env bash
# Soak: mixed pgbench workloads through a release-built iampool in front of a throwaway
# PostgreSQL 15 for SOAK_SECONDS (default 30 minutes), with faults injected on a schedule,
# plus commit-ledger writers (examples/soak_ledger.rs). Reports failed transactions by cause,
# the ledger result, and the pooler's RSS and open file descriptors over time (from /proc),
# with a least-squares slope so a leak shows. Not run in CI. benches/README.md documents it.
#
#   sudo benches/soak.sh                          # 30 minutes
#   sudo SOAK_SECONDS=240 SOAK_FAULT_EVERY=20 benches/soak.sh   # a short run
#
# Faults, in turn, every SOAK_FAULT_EVERY seconds: PostgreSQL restarted (pg_ctl restart -m
# fast); every bench backend killed (pg_terminate_backend); a client that asks for 8 GB and
# reads nothing for 20 s; 50 slowloris sockets sending their startup packet a byte a second.
# Everything it starts and its temp dir are removed on exit, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=soak
# shellcheck source=benches/lib.sh
source benches/lib.sh

DURATION=${SOAK_SECONDS:-1800}
FAULT_EVERY=${SOAK_FAULT_EVERY:-60}
SEGMENT=${SOAK_SEGMENT:-30}
CLIENTS=${SOAK_CLIENTS:-32}
WRITERS=${SOAK_LEDGER_WRITERS:-4}
SAMPLE_EVERY=${SOAK_SAMPLE_EVERY:-5}
SCALE=${SOAK_SCALE:-10}
POOL_SIZE=${SOAK_POOL_SIZE:-10}
MAX_CLIENT_CONN=500
OUT=${SOAK_OUT:-benches/results-soak-$(date -u +%Y-%m-%d-%H%M%S).md}
for n in "$DURATION" "$FAULT_EVERY" "$SEGMENT" "$CLIENTS" "$WRITERS" "$SAMPLE_EVERY" "$SCALE" "$POOL_SIZE"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "SOAK_* values must be positive integers (got '$n')"
done
WORKLOADS=(tpcb-simple select-extended tpcb-prepared select-simple tpcb-extended)

[[ -n ${BENCH_SKIP_SETUP:-} ]] || scripts/setup.sh
find_iampool
log "building the ledger writer (cargo build --release --locked --example soak_ledger)"
cargo build --release --locked --example soak_ledger >&2
LEDGER_BIN=$(realpath "${CARGO_TARGET_DIR:-target}/release/examples/soak_ledger")

bench_init
BG=()
soak_cleanup() {
  local rc=$? p
  for p in "${BG[@]}"; do kill "$p" 2>/dev/null || true; done
  (exit "$rc")
  bench_cleanup
}
trap soak_cleanup EXIT
add_system iampool "$IAMPOOL_BIN"
pg_start 200
configure_system iampool
# Timeouts short enough that the faults below resolve within a segment.
printf '%s\n' --client-login-timeout 5s --query-wait-timeout 30s --server-login-retry 200ms \
  >>"$WORK/iampool/iampool.args"
log "starting iampool ${VERSION[iampool]} on port ${PORT[iampool]}"
start_system iampool
IPORT=${PORT[iampool]}
IPID=${SPID[iampool]}
START=$(date +%s)
END=$((START + DURATION))
now() { echo $(($(date +%s) - START)); }

# ---------------------------------------------------------------- background: samples
SAMPLES=$WORK/samples.tsv
printf 't_s\trss_kib\tfds\tthreads\n' >"$SAMPLES"
(
  while (($(date +%s) < END)); do
    fds=$(find "/proc/$IPID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    nthreads=$(awk '$1 == "Threads:" {print $2}' "/proc/$IPID/status" 2>/dev/null || echo -)
    printf '%s\t%s\t%s\t%s\n' "$(now)" "$(rss_kib "$IPID")" "$fds" "$nthreads" >>"$SAMPLES"
    sleep "$SAMPLE_EVERY"
  done
) &
SAMPLER=$!
BG+=("$SAMPLER")

# ---------------------------------------------------------------- background: ledger
"$LEDGER_BIN" --port "$IPORT" --check-port "$PG_PORT" --user bench --password "$PW" --db bench \
  --writers "$WRITERS" --seconds "$DURATION" >"$WORK/ledger.out" 2>&1 &
LEDGER=$!
BG+=("$LEDGER")

# ---------------------------------------------------------------- background: faults
EVENTS_TSV=$WORK/faults.tsv
: >"$EVENTS_TSV"
pg_psql() { psql -X -q -At -h "$WORK" -p "$PG_PORT" -U postgres -d postgres "$@"; }
(
  i=0
  while true; do
    sleep "$FAULT_EVERY"
    (($(date +%s) + 10 < END)) || break
    case $((i % 4)) in
      0)
        if as_pg setsid "$PG_BIN/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -m fast -w -t 60 \
          restart >/dev/null 2>&1; then
          what="PostgreSQL restarted (fast)"
        else
          what="PostgreSQL restart FAILED"
        fi ;;
      1)
        n=$(pg_psql -c "select count(pg_terminate_backend(pid)) from pg_stat_activity \
          where datname = 'bench' and usename = 'bench'" 2>&1 || true)
        what="pg_terminate_backend of $n bench backends" ;;
      2)
        what=$(timeout 60 python3 benches/soak_faults.py stall --port "$IPORT" --user bench \
          --password "$PW" --db bench --seconds 20 2>&1 || true) ;;
      3)
        what=$(timeout 60 python3 benches/soak_faults.py slowloris --port "$IPORT" --count 50 \
          --seconds 20 2>&1 || true) ;;
    esac
    printf '%s\t%s\n' "$(now)" "$what" >>"$EVENTS_TSV"
    log "t=$(now)s fault: $what"
    i=$((i + 1))
  done
) &
FAULTS=$!
BG+=("$FAULTS")

# ---------------------------------------------------------------- foreground: pgbench
SEGMENTS=$WORK/segments.tsv
printf 'start_s\tworkload\tclients\tprocessed\tfailed\taborted_clients\texit\n' >"$SEGMENTS"
CAUSES=$WORK/causes.txt
: >"$CAUSES"
k=0
while (($(date +%s) + 5 < END)); do
  left=$((END - $(date +%s)))
  t=$SEGMENT
  ((t <= left)) || t=$left
  w=${WORKLOADS[$((k % ${#WORKLOADS[@]}))]}
  args=(-n -c "$CLIENTS" -j 2 -T "$t" -M "${w#*-}")
  [[ $w == select-* ]] && args+=(-S)
  started=$(now)
  out=$WORK/pgbench-$k.log
  rc=0
  timeout -k 10 $((t + 60)) pgbench "${args[@]}" -h 127.0.0.1 -p "$IPORT" -U bench bench \
    >"$out" 2>&1 || rc=$?
  processed=$(awk -F': ' '/number of transactions actually processed/ {split($2, a, "/"); print a[1]}' "$out")
  failed=$(awk -F': ' '/number of failed transactions/ {split($2, a, " "); print a[1]}' "$out")
  aborted=$(grep -c 'aborted in command' "$out" || true)
  # A client that could not even connect is counted too.
  aborted=$((aborted + $(grep -c 'connection to server .* failed' "$out" || true)))
  # Causes: the server's or iampool's message, numbers and pids stripped.
  { grep -E 'aborted in command|connection to server' "$out" || true; } |
    sed -E 's/.*aborted in command [0-9]+ query [0-9]+: //
      s/.*aborted in command [0-9]+ \([A-Za-z]+\) of script [0-9]+; //
      s/.*connection to server at [^,]*, port [0-9]+ failed: //
      s/[0-9]+/N/g; s/[[:space:]]+/ /g; s/^ //' >>"$CAUSES"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$started" "$w" "$CLIENTS" "${processed:-0}" \
    "${failed:-0}" "$aborted" "$rc" >>"$SEGMENTS"
  log "t=${started}s $w: ${processed:-0} transactions, ${failed:-0} failed, $aborted clients aborted"
  ensure_up iampool "during segment $k" || die "iampool exited (see above); a soak stops here"
  k=$((k + 1))
done

log "waiting for the ledger check"
wait "$FAULTS" 2>/dev/null || true
ledger_rc=0
wait "$LEDGER" || ledger_rc=$?
wait "$SAMPLER" 2>/dev/null || true
printf '%s\t%s\t%s\t%s\n' "$(now)" "$(rss_kib "$IPID")" \
  "$(find "/proc/$IPID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)" \
  "$(awk '$1 == "Threads:" {print $2}' "/proc/$IPID/status" 2>/dev/null || echo -)" >>"$SAMPLES"

# ---------------------------------------------------------------- report
slope() { # COLUMN [FROM_S]: least-squares slope per minute of samples from FROM_S on
  awk -F'\t' -v c="$1" -v from="${2:-0}" 'NR > 1 && $1 >= from && $c ~ /^[0-9]+$/ {
      n++; x = $1 / 60; sx += x; sy += $c; sxx += x * x; sxy += x * $c
      if (n == 1) first = $c; last = $c; if ($c > max) max = $c }
    END { d = n * sxx - sx * sx; s = (d > 0) ? (n * sxy - sx * sy) / d : 0
      printf "%+.1f per minute (first %d, last %d, max %d, %d samples)", s, first, last, max, n }' "$SAMPLES"
}
HALF=$((DURATION / 2))
{
  echo "# iampool soak, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "iampool $(iampool_commit), ${DURATION}s, $CLIENTS pgbench clients in ${SEGMENT}s segments" \
    "(${WORKLOADS[*]}), pool_size $POOL_SIZE, scale $SCALE, $WRITERS ledger writers," \
    "a fault every ${FAULT_EVERY}s."
  echo
  echo "## Ledger"
  echo
  echo '```'
  cat "$WORK/ledger.out"
  echo '```'
  echo
  echo "## pgbench"
  echo
  awk -F'\t' 'NR > 1 {p += $4; f += $5; a += $6; n++}
    END {printf "%d segments: %d transactions, %d failed transactions, %d clients aborted\n", n, p, f, a}' "$SEGMENTS"
  echo
  echo "Aborted clients by cause:"
  echo
  if [[ -s $CAUSES ]]; then sort "$CAUSES" | uniq -c | sort -rn | sed 's/^/    /'; else echo "    (none)"; fi
  echo
  echo '| start (s) | workload | processed | failed | aborted clients | exit |'
  echo '|---:|---|---:|---:|---:|---:|'
  awk -F'\t' 'NR > 1 {printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $4, $5, $6, $7}' "$SEGMENTS"
  echo
  echo "## Faults"
  echo
  awk -F'\t' '{printf "- t=%ss: %s\n", $1, $2}' "$EVENTS_TSV"
  echo
  echo "## The pooler over time (from /proc/$IPID)"
  echo
  echo "Whole run, then its second half (past the warm-up; a leak keeps a positive slope there):"
  echo
  echo "- RSS (KiB): $(slope 2); second half $(slope 2 "$HALF")"
  echo "- open file descriptors: $(slope 3); second half $(slope 3 "$HALF")"
  echo "- threads: $(slope 4); second half $(slope 4 "$HALF")"
  echo
  echo '| t (s) | RSS (KiB) | fds | threads |'
  echo '|---:|---:|---:|---:|'
  # At most ~30 rows: every n-th sample, and the last.
  rows=$(($(wc -l <"$SAMPLES") - 1))
  step=$(((rows + 29) / 30))
  ((step >= 1)) || step=1
  awk -F'\t' -v s="$step" -v last="$((rows + 1))" 'NR > 1 && ((NR - 2) % s == 0 || NR == last) {
    printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$SAMPLES"
} >"$OUT"
cat "$OUT"
log "report written to $OUT"
((ledger_rc == 0)) || die "the ledger check failed (exit $ledger_rc)"
