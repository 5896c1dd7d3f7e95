#!/usr/bin/env bash
# Everything a session with the GPU should run, in one `device run` call (30 minutes of device
# time in all, 10 per command): tests/gpu, then tools/bench_gpu.py; logs and the table under $OUT.
#
#   here:   bash ../shared/tools/gpu-wheels.sh          # deepspeed, hydra, ... as wheels in .whl/
#   device: run(command="bash tools/gpu_session.sh", carry=[".whl"])
#
# Arguments go to bench_gpu.py (e.g. --only train). The table is printed last.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider > "$OUT/pytest-gpu.txt" 2>&1
echo "tests/gpu: exit $?"
grep -E "passed|failed|error" "$OUT/pytest-gpu.txt" | tail -3
python3 tools/bench_gpu.py --out "$OUT" "$@"
