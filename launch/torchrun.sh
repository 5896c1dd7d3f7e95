#!/usr/bin/env bash
# Train with torchrun on one node or many, and exit with the *trainer's* exit code.
#
# torchrun reports any failing rank as its own exit code 1, so this script asks the trainer for
# its real one (MEGATRAIN_EXIT_STATUS, see megatrain/jobs/exit_status.py): 0 done, 75 saved
# on a signal (run the same command again to resume), 2 configuration error (don't retry).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/torchrun.sh [options] [--] [hydra overrides...]

  one node:    launch/torchrun.sh --nproc-per-node 8 model=gpt2-small deepspeed=zero2
  many nodes:  run on every node (the same command):
               launch/torchrun.sh --nnodes 4 --nproc-per-node 8 --master-addr node001 \
                   --rdzv-id myrun model=gpt2-small

options (environment variable read when the option is absent):
  --nproc-per-node N  ranks on this node [NPROC_PER_NODE]; default: the GPUs, else 1
  --nnodes N          number of nodes [NNODES]; default 1
  --master-addr HOST  rendezvous host, one of the nodes [MASTER_ADDR]; needed with --nnodes > 1
  --master-port PORT  rendezvous port [MASTER_PORT]; default 29400
  --node-rank R       this node's rank [NODE_RANK]: fixes the node order (static rendezvous);
                      without it nodes take ranks as they join (c10d rendezvous)
  --rdzv-id ID        a name the nodes of one run share [RDZV_ID]; default megatrain
  -h, --help          this text
  PYTHON              the interpreter with megatrain installed; default python3

signals: USR1 (to this script, or to every process of the job) makes the ranks finish their
step, save and exit 75; torchrun itself ignores USR1 (its default action would kill it and
orphan the ranks). TERM goes to torchrun, which passes it on and gives the ranks
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default here 120) to save before it kills them.

exit code: the trainer's (0, 75, 2, 1), or torchrun's when the trainer never started.
EOF
}

die() { echo "torchrun.sh: $*" >&2; exit 2; }

gpu_count() {
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 1
  fi
}

NPROC=${NPROC_PER_NODE:-}
NODES=${NNODES:-1}
ADDR=${MASTER_ADDR:-}
PORT=${MASTER_PORT:-29400}
RANK_OF_NODE=${NODE_RANK:-}
RDZV=${RDZV_ID:-megatrain}
OVERRIDES=()
while (($#)); do
  case $1 in
    --nproc-per-node) NPROC=${2:?}; shift 2 ;;
    --nnodes) NODES=${2:?}; shift 2 ;;
    --master-addr) ADDR=${2:?}; shift 2 ;;
    --master-port) PORT=${2:?}; shift 2 ;;
    --node-rank) RANK_OF_NODE=${2:?}; shift 2 ;;
    --rdzv-id) RDZV=${2:?}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done
NPROC=${NPROC:-$(gpu_count)}
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node must be a positive integer, not '$NPROC'"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, not '$NODES'"

rendezvous_args() {
  if ((NODES == 1)); then
    echo --standalone --nnodes=1
  elif [[ -z $ADDR ]]; then
    die "--nnodes $NODES needs --master-addr (or MASTER_ADDR): the host of the rendezvous"
  elif [[ -n $RANK_OF_NODE ]]; then
    echo --nnodes="$NODES" --node-rank="$RANK_OF_NODE" --master-addr="$ADDR" --master-port="$PORT"
  else
    echo --nnodes="$NODES" --rdzv-backend=c10d --rdzv-endpoint="$ADDR:$PORT" --rdzv-id="$RDZV"
  fi
}
RDZV_ARGS=$(rendezvous_args)

# The trainer's exit status, node-local: only this node's first rank writes it.
if [[ -z ${MEGATRAIN_EXIT_STATUS:-} ]]; then
  MEGATRAIN_EXIT_STATUS=$(mktemp -t megatrain-exit.XXXXXX)
  trap 'rm -f "$MEGATRAIN_EXIT_STATUS"' EXIT
fi
export MEGATRAIN_EXIT_STATUS
rm -f "$MEGATRAIN_EXIT_STATUS"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

TORCHRUN_PID=
SIGNALLED=0
# shellcheck disable=SC2317  # trap handlers
on_usr1() {  # the ranks are torchrun's children; they save at the next step boundary
  SIGNALLED=1
  if [[ -n $TORCHRUN_PID ]]; then pkill -USR1 -P "$TORCHRUN_PID" || true; fi
}
# shellcheck disable=SC2317
on_term() {
  SIGNALLED=1
  if [[ -n $TORCHRUN_PID ]]; then kill -TERM "$TORCHRUN_PID" 2>/dev/null || true; fi
}
trap on_usr1 USR1
trap on_term TERM
trap 'SIGNALLED=1' INT  # Ctrl-C reaches torchrun directly; keep waiting for it

# shellcheck disable=SC2086  # RDZV_ARGS is a list of flags
(trap '' USR1; exec "${PYTHON:-python3}" -m torch.distributed.run $RDZV_ARGS \
   --nproc-per-node="$NPROC" -m megatrain.train "${OVERRIDES[@]}") &
TORCHRUN_PID=$!

wait_for() {  # wait_for PID: its exit code; a trapped signal interrupts 'wait', so wait again
  local rc last=0
  while :; do
    SIGNALLED=0
    wait "$1" && rc=0 || rc=$?
    if ((SIGNALLED && rc > 128)); then last=$rc; continue; fi
    ((rc == 127 && last)) && rc=$last  # it ended while we were interrupted
    return "$rc"
  done
}
wait_for "$TORCHRUN_PID" && code=0 || code=$?

if [[ -s $MEGATRAIN_EXIT_STATUS ]]; then
  code=$(sed -n 's/.*"exit_code": *\([0-9][0-9]*\).*/\1/p' "$MEGATRAIN_EXIT_STATUS")
  echo "torchrun.sh: trainer exited $code" >&2
else
  echo "torchrun.sh: no exit status from the trainer; torchrun exited $code" >&2
fi
exit "$code"
