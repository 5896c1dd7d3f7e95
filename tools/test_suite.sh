#!/usr/bin/env bash
# The whole suite as two pytest processes at once: the in-process unit tests beside the tests
# that start processes (those run one after another, as their signal and kill timings need).
# On two cores this fills the time a process test leaves a core idle (Python start-up is
# single-threaded). The unit lane is much the shorter, so it also takes the process tests that
# time nothing (fine-tuning runs compared with references), ~2.5 minutes of CI.
# Usage: tools/test_suite.sh PYTHON [PYTEST ARGS...]
set -uo pipefail
py=$1
shift
untimed=(tests/integration/test_finetune.py tests/integration/test_loss_normalisation.py)
unit_log=$(mktemp)
"$py" -m pytest tests/unit "${untimed[@]}" "$@" >"$unit_log" 2>&1 &
unit=$!
trap 'kill "$unit" 2>/dev/null; rm -f "$unit_log"' EXIT
"$py" -m pytest tests --ignore=tests/unit "${untimed[@]/#/--ignore=}" "$@"
processes=$?
wait "$unit"
unit_status=$?
echo "----- tests/unit and ${untimed[*]} -----"
cat "$unit_log"
echo "unit lane: exit $unit_status; the other tests: exit $processes"
# 5 is "no test selected": a -k or path that picks tests from one side only.
((processes == 5)) && processes=0
((unit_status == 5)) && unit_status=0
exit $((processes != 0 ? processes : unit_status))
