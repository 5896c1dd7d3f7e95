#!/usr/bin/env bash
# Fill launch/slurm/pretrain.sbatch's options and submit it (prints the sbatch command first).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/slurm/submit.sh --name NAME [options] [--] [hydra overrides...]

  launch/slurm/submit.sh --name gpt2-small --nodes 4 --gpus-per-node 8 --time 2-00:00:00 \
      --partition gpu --account myproj -- model=gpt2-small deepspeed=zero2 data.train=data/web

options:
  --name NAME           job name and run.name; the run folder is outputs/NAME (required)
  --run-dir DIR         the run folder instead (keep it the same to resume a run)
  --nodes N             nodes (default 1)
  --gpus-per-node N     GPUs per node = ranks per node (default 0: CPU ranks, see --nproc-per-node)
  --nproc-per-node N    ranks per node when it differs from the GPUs (e.g. CPU ranks)
  --cpus-per-task N     CPUs per node for torchrun's ranks and data loaders
  --time T              time limit, e.g. 24:00:00 (default 24:00:00)
  --grace S             seconds before the limit at which the ranks save and requeue (default 300)
  --partition P, --account A, --qos Q
  --max-requeues N      stop requeueing after N attempts (default 100)
  --sbatch-arg ARG      any other sbatch option, repeatable (e.g. --sbatch-arg=--exclusive)
  --dry-run             print the sbatch command, submit nothing
  -h, --help            this text

Prints the job id. Logs: <run folder>/logs/; stop requeueing: touch <run folder>/NO_REQUEUE.
EOF
}

die() { echo "submit.sh: $*" >&2; exit 2; }

HOME_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NAME='' RUN_DIR='' NODES=1 GPUS=0 NPROC='' CPUS='' TIME=24:00:00 GRACE=300 MAX_REQUEUES=100 DRY=0
EXTRA=()
while (($#)); do
  case $1 in
    --name) NAME=${2:?}; shift 2 ;;
    --run-dir) RUN_DIR=${2:?}; shift 2 ;;
    --nodes) NODES=${2:?}; shift 2 ;;
    --gpus-per-node) GPUS=${2:?}; shift 2 ;;
    --nproc-per-node) NPROC=${2:?}; shift 2 ;;
    --cpus-per-task) CPUS=${2:?}; shift 2 ;;
    --time) TIME=${2:?}; shift 2 ;;
    --grace) GRACE=${2:?}; shift 2 ;;
    --partition) EXTRA+=("--partition=${2:?}"); shift 2 ;;
    --account) EXTRA+=("--account=${2:?}"); shift 2 ;;
    --qos) EXTRA+=("--qos=${2:?}"); shift 2 ;;
    --max-requeues) MAX_REQUEUES=${2:?}; shift 2 ;;
    --sbatch-arg) EXTRA+=("${2:?}"); shift 2 ;;
    --sbatch-arg=*) EXTRA+=("${1#--sbatch-arg=}"); shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) break ;;
  esac
done
[[ -n $NAME ]] || { usage >&2; die "--name is required"; }
RUN_DIR=${RUN_DIR:-outputs/$NAME}

ARGS=(--job-name="$NAME" --nodes="$NODES" --ntasks-per-node=1 --time="$TIME"
      --signal="B:USR1@$GRACE" --output="$RUN_DIR/logs/slurm-%j.out"
      --export="ALL,RUN_DIR=$RUN_DIR,MEGATRAIN_HOME=$HOME_DIR,MAX_REQUEUES=$MAX_REQUEUES${NPROC:+,NPROC_PER_NODE=$NPROC}")
((GPUS > 0)) && ARGS+=(--gpus-per-node="$GPUS")
[[ -n $CPUS ]] && ARGS+=(--cpus-per-task="$CPUS")
CMD=(sbatch --parsable "${ARGS[@]}" "${EXTRA[@]}" "$HOME_DIR/launch/slurm/pretrain.sbatch"
     run.name="$NAME" "$@")
echo "${CMD[*]}" >&2
((DRY)) && exit 0
mkdir -p "$RUN_DIR/logs"  # sbatch does not create the folder of --output
"${CMD[@]}"
