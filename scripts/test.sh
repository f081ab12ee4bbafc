#!/usr/bin/env bash
# The test command: install prerequisites, build every target, run every test (unit and
# integration; the integration tests start real PostgreSQL 15 clusters of their own).
# Nothing is skipped quietly: ignored tests are listed, and a run with no tests fails.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --all-targets --locked

log=$(mktemp /tmp/iampool-test-XXXXXX.log)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --no-fail-fast "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

sum() { grep '^test result:' "$log" | grep -o "[0-9]\+ $1" | awk '{n += $1} END {print n + 0}'; }
passed=$(sum passed)
failed=$(sum failed)
ignored=$(sum ignored)
suites=$(grep -c '^test result:' "$log" || true)

echo
echo "==== iampool tests: $suites suites ===="
if [[ $ignored -gt 0 ]]; then
  echo "IGNORED tests (not run):"
  grep -E '^test .* \.\.\. ignored' "$log" | sed 's/^/  /' || true
fi
if [[ $failed -gt 0 ]]; then
  echo "FAILED tests:"
  grep -E '^test .* \.\.\. FAILED' "$log" | sed 's/^/  /' || true
fi
if [[ $rc -eq 0 && $passed -eq 0 ]]; then
  echo "no test ran: treating as a failure"
  rc=1
fi
echo "summary: $passed passed, $failed failed, $ignored skipped"
exit "$rc"
