#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian's slurm-wlm + munge): the fixture for
# tests/launch and a way to try megatrain's SLURM path on a laptop or a CI runner.
#
# It runs as root (SlurmUser=root), writes its own /etc/slurm/slurm.conf (never over one it did
# not write), keeps its state, logs and pid files under $SLURM_LOCAL_STATE, and starts the daemons
# directly (no systemd needed). Every command is idempotent.
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/lib/megatrain-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by megatrain tools/slurm_local.sh"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET_DIR=/run/munge

usage() {
  cat <<EOF
usage: tools/slurm_local.sh {up|down|status|install}

  install   apt-get install slurm-wlm and munge (Debian / Ubuntu), unless already installed
  up        install, write $CONF, start munged + slurmctld + slurmd, wait until the node is idle
  down      stop the daemons that 'up' started (by their pid files); the config stays
  status    print the node's state; exit 0 only when the cluster accepts jobs

Environment:
  SLURM_LOCAL_CPUS    CPUs the node advertises (default: nproc, at least 2, so that a job can
                      run 2 CPU ranks)
  SLURM_LOCAL_STATE   state, logs and pid files (default: /var/lib/megatrain-slurm)

Then: sbatch launch/slurm/pretrain.sbatch ... (see docs/launching.md); logs in \$SLURM_LOCAL_STATE.
EOF
}

die() { echo "slurm_local: $*" >&2; exit 1; }
say() { echo "slurm_local: $*" >&2; }

need_root() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and runs slurmd as root)"
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
      && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "slurm is not installed and apt-get is missing (not Debian?)"
  say "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed (no network or no apt sources?)"
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed"
}

node_cpus() {
  local cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
  (( cpus >= 2 )) || cpus=2
  echo "$cpus"
}

write_config() {
  if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to replace a real cluster's config"
  fi
  local host cpus
  host=$(hostname -s)
  cpus=$(node_cpus)
  mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
  cat >"$CONF.tmp" <<EOF
$MARKER
ClusterName=megatrain-local
# 127.0.0.1: the node need not resolve its own name (containers, CI runners).
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# A node that declares more CPUs than the machine has (SLURM_LOCAL_CPUS) is still accepted.
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
# Finished jobs stay visible to 'scontrol show job' for 10 minutes (tests read their state).
MinJobAge=600
KillWait=30
# A requeued job waits cred_expire + 1 s before it may start again (120 s by default); locally
# there is no reason to wait that long.
AuthInfo=cred_expire=5
# ...and the schedulers look at pending jobs every second, not every 30-60 s.
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if [[ -f $CONF ]] && cmp -s "$CONF" "$CONF.tmp"; then
    rm "$CONF.tmp"
  else
    mv "$CONF.tmp" "$CONF"
    CONFIG_CHANGED=1
  fi
}

alive() {  # alive PIDFILE: the process named in the pid file runs
  [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  if [[ ! -s $MUNGE_KEY ]]; then
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
  fi
  chown munge:munge "$MUNGE_KEY" 2>/dev/null || true
  chmod 0400 "$MUNGE_KEY"
  mkdir -p "$MUNGE_SOCKET_DIR" /var/log/munge /var/lib/munge
  chown munge:munge "$MUNGE_SOCKET_DIR" /var/log/munge /var/lib/munge 2>/dev/null || true
  # As root munged needs --force; it then warns about its log folder's owner (harmless).
  munged --force --pid-file="$STATE/munged.pid" 2>>"$STATE/munged.err" \
    || die "munged did not start (see $STATE/munged.err)"
  munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
}

start_slurm() {
  if [[ ${CONFIG_CHANGED:-0} == 1 ]]; then
    stop_slurm  # daemons read slurm.conf at start
  fi
  alive "$STATE/slurmctld.pid" || slurmctld || die "slurmctld did not start (see $STATE/slurmctld.log)"
  alive "$STATE/slurmd.pid" || slurmd || die "slurmd did not start (see $STATE/slurmd.log)"
}

wait_until_idle() {
  local host state
  host=$(hostname -s)
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    case $state in
      idle*|mixed*|allocated*|completing*) say "node $host is $state"; return 0 ;;
      down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  die "node $host did not become idle (state '${state:-none}'); see $STATE/slurmd.log"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
  alive "$2" || return 0
  local pid
  pid=$(cat "$2")
  kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  die "$1 (pid $pid) did not stop"
}

stop_slurm() {
  stop_pidfile slurmd "$STATE/slurmd.pid"
  stop_pidfile slurmctld "$STATE/slurmctld.pid"
}

cmd_up() {
  need_root
  install_packages
  mkdir -p "$STATE"
  write_config
  start_munge
  start_slurm
  wait_until_idle
}

cmd_down() {
  need_root
  stop_slurm
  stop_pidfile munged "$STATE/munged.pid"
  say "stopped"
}

cmd_status() {
  command -v sinfo >/dev/null || die "slurm is not installed"
  local state
  state=$(sinfo -h -o %T 2>/dev/null) || die "slurmctld does not answer"
  echo "$state"
  [[ $state =~ ^(idle|mixed|allocated|completing) ]] || die "no node accepts jobs"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  install) need_root; install_packages ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
