#!/usr/bin/env bash
# Builds every fuzz target (fuzz/, cargo-fuzz with libFuzzer) and runs each for a bounded
# time from the committed seeds (fuzz/seeds/<target>), into a temporary copy of the corpus
# so the repository is not modified. A crash, a leak, an input slower than FUZZ_TIMEOUT
# seconds or a run over FUZZ_RSS_MB fails it; the offending input is left in
# fuzz/artifacts/<target>/ (git-ignored) for `cargo +nightly fuzz run <target> <file>`.
#
#   FUZZ_SECONDS  per target (default 20)    FUZZ_TARGETS  space-separated (default: all)
#   FUZZ_TIMEOUT  per input (default 10)     FUZZ_RSS_MB   memory cap (default 2048)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-20}
per_input=${FUZZ_TIMEOUT:-10}
rss_mb=${FUZZ_RSS_MB:-2048}

log() { printf 'fuzz: %s\n' "$*" >&2; }

# Prerequisites, as scripts/setup.sh does for the tests: a nightly toolchain and cargo-fuzz.
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

cd fuzz
# Build once, all targets (the sanitizer build of the dependencies is most of the time).
cargo +nightly fuzz build
targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}

work=$(mktemp -d /tmp/iampool-fuzz-XXXXXX)
trap 'rm -rf "$work"' EXIT
failed=()
for t in $targets; do
  corpus=$work/$t
  mkdir -p "$corpus" "artifacts/$t"
  [[ -d seeds/$t ]] && cp seeds/"$t"/* "$corpus"/ 2>/dev/null || true
  log "$t: ${seconds}s"
  if ! cargo +nightly fuzz run "$t" "$corpus" -- \
    -max_total_time="$seconds" -timeout="$per_input" -rss_limit_mb="$rss_mb" \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 \
    >"$work/$t.log" 2>&1; then
    tail -n 60 "$work/$t.log" >&2
    failed+=("$t")
    continue
  fi
  grep -E '^stat::number_of_executed_units|^Done ' "$work/$t.log" | sed "s/^/fuzz: $t: /" >&2 || true
done

if [[ ${#failed[@]} -gt 0 ]]; then
  log "FAILED: ${failed[*]} (inputs in fuzz/artifacts/)"
  exit 1
fi
log "all targets ran ${seconds}s without a finding"
