#!/usr/bin/env bash
# The whole suite as two lanes at once: the in-process unit tests beside the tests that start
# processes (those run one after another, as their signal and kill timings need). On two cores
# this fills the time a process test leaves a core idle (Python start-up is single-threaded).
# The unit lane is much the shorter, so it also takes the process tests that time nothing
# (fine-tuning runs compared with references), ~2.5 minutes of CI.
# The unit tests that hold a one-rank DeepSpeed process group (tests/unit/conftest.py: DeepSpeed
# keeps it for the process's life) get a pytest process of their own, so no other test runs
# beside a live process group. Each lane has a wall-clock limit: a test that hangs ends the lane
# with Python's stack dump (pytest's faulthandler_timeout, then SIGINT's traceback) instead of
# the CI's own timeout with nothing to read.
# Usage: tools/test_suite.sh PYTHON [PYTEST ARGS...]
set -uo pipefail
py=$1
shift
untimed=(tests/integration/test_finetune.py tests/integration/test_loss_normalisation.py)
one_rank=(tests/unit/test_checkpoint_safety.py tests/unit/test_engine_optimizer.py)
LANE_LIMIT=${LANE_LIMIT:-2400}  # seconds; the longest lane takes ~15 minutes on 2 cores

lane() {  # a pytest run under the lane limit: SIGINT first (pytest prints where it was)
  timeout -s INT -k 60 "$LANE_LIMIT" "$py" -m pytest "$@"
}

unit_lane() {
  lane tests/unit "${one_rank[@]/#/--ignore=}" "${untimed[@]}" "$@"
  local first=$?
  lane "${one_rank[@]}" "$@"
  local second=$?
  ((first == 5)) && first=0  # 5 is "no test selected": a -k that picks from one run only
  ((second == 5)) && second=0
  return $((first != 0 ? first : second))
}

unit_log=$(mktemp)
unit_lane "$@" >"$unit_log" 2>&1 &
unit=$!
trap 'kill "$unit" 2>/dev/null; rm -f "$unit_log"' EXIT
lane tests --ignore=tests/unit "${untimed[@]/#/--ignore=}" "$@"
processes=$?
wait "$unit"
unit_status=$?
echo "----- tests/unit and ${untimed[*]} -----"
cat "$unit_log"
echo "unit lane: exit $unit_status; the other tests: exit $processes"
((processes == 5)) && processes=0
exit $((processes != 0 ? processes : unit_status))
