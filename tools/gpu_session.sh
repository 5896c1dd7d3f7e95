#!/usr/bin/env bash
# Everything a session with the GPU should run, in one `device run` call that fits its 10-minute
# command limit (15 minutes of device time in all, start-up included): tests/gpu, then
# tools/bench_gpu.py (matmul, attention kernels, the trainer with the fast paths on for
# gpt2-small, llama-1b, bert-large and t5-base, then the peers' anchors); logs and the table
# under $OUT, the table printed last.
#
#   here:   bash ../shared/tools/gpu-wheels.sh torchao==0.18.0   # deepspeed, hydra, torchao ... in .whl/
#   device: run(command="bash tools/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# Arguments go to bench_gpu.py (e.g. --only train). GPU_SESSION_S (default 560) is the whole
# script's budget: tests/gpu get at most GPU_TESTS_S (default 200) of it, the benchmarks the rest.
set -uo pipefail
start=$(date +%s)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
timeout "${GPU_TESTS_S:-200}" python3 -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider \
  > "$OUT/pytest-gpu.txt" 2>&1
echo "tests/gpu: exit $? (124: stopped at GPU_TESTS_S)"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/pytest-gpu.txt" | tail -40
left=$(( ${GPU_SESSION_S:-560} - ($(date +%s) - start) ))
python3 tools/bench_gpu.py --out "$OUT" --budget-s "$left" "$@"
# what comes back is at most 8 files, 2 folders down: the logs and metrics travel as one archive
tar czf "$OUT/logs.tgz" -C "$OUT" logs train 2>/dev/null && rm -rf "$OUT/logs" "$OUT/train"
