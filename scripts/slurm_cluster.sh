#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the slow tests of `hydra/launcher=slurm`
# (tests/test_slurm.py). Debian only, as root; there is no systemd: the daemons are started
# directly and stopped by the PIDs this script records.
#
#     bash scripts/slurm_cluster.sh start STATE_DIR   # install what is missing, start, wait for the node
#     . STATE_DIR/env                                  # SLURM_CONF and PATH for sbatch, squeue, ...
#     bash scripts/slurm_cluster.sh stop STATE_DIR    # cancel the jobs, stop the daemons started here
#
# `start` installs the Debian packages `slurm-wlm` and `munge` when `slurmctld` is not on PATH,
# writes a munge key when there is none, writes STATE_DIR/etc/slurm.conf (the node as `slurmd -C`
# sees it, one partition `debug`), starts a munged of its own (as the munge user, on a socket
# named after STATE_DIR), slurmctld and slurmd (as root), records their PIDs in STATE_DIR/pids and waits until the
# node is idle. Everything else the cluster writes stays under STATE_DIR (logs in STATE_DIR/log).
#
# There is no accounting database, so the real `sacct` fails, and submitit, which polls `sacct`,
# would then wait forever on a job that ended without a result. STATE_DIR/bin/sacct stands in for
# it (the first on PATH once STATE_DIR/env is sourced): it answers submitit's
# `sacct -o JobID,State,NodeList --parsable2 -j ID ...` from squeue, which keeps ended jobs for
# MinJobAge seconds.
#
# The settings let a requeued job (`scontrol requeue ID`) start again within ~15 s: KillWait=15
# (a job that saves before it exits has that long after SIGTERM, also on a loaded machine),
# AuthInfo=cred_expire=10, sched_interval=2. slurmctld and slurmd listen on the first two free
# ports from SLURM's defaults (6817, 6818) and each cluster has its own munged, so that two test
# clusters (two CI runs) can run on one host and stop apart. No cgroups (proctrack/linuxproc, task/none), so
# memory limits are not enforced; DefMemPerCPU keeps one job from reserving the whole node.
# JobRequeue=0, as on clusters that do not requeue batch jobs unless they ask for it: the slurm
# launcher preset asks (sbatch --requeue), and the tests prove that it has to.
#
# Exit status: 0 when the cluster is up (or stopped), 1 with one line on stderr when it cannot
# start (not root, no apt-get, a daemon that does not start; the logs under STATE_DIR/log say why).
set -uo pipefail

PROG="slurm_cluster.sh"
READY_TIMEOUT="${SLURM_CLUSTER_TIMEOUT:-60}"   # seconds to wait for the node to be idle
PARTITION="debug"

die() {
  echo "$PROG: error: $*" >&2
  exit 1
}

usage() {
  echo "usage: $PROG start|stop|status STATE_DIR" >&2
  exit 2
}

[ $# -eq 2 ] || usage
action="$1"
mkdir -p "$2" 2>/dev/null || die "cannot create the state directory $2"
state="$(cd "$2" && pwd)"
conf="$state/etc/slurm.conf"
pids="$state/pids"
log="$state/log"
# this cluster's name and munge socket, apart from any other test cluster on this host
cluster_id="aomd-$(echo -n "$state" | md5sum | cut -c1-8)"
munge_socket="/run/munge/$cluster_id.socket"

# ---------------------------------------------------------------------------------------------
# processes recorded in STATE_DIR/pids, one "name pid" a line

alive() {  # alive NAME PID: the process PID is running and is NAME (not a reused PID)
  local comm
  comm="$(cat "/proc/$2/comm" 2>/dev/null)" || return 1
  [ "$comm" = "$1" ]
}

recorded_alive() {  # all recorded daemons are running (and at least one is recorded)
  [ -s "$pids" ] || return 1
  local name pid
  while read -r name pid; do
    alive "$name" "$pid" || return 1
  done <"$pids"
}

stop_recorded() {
  [ -f "$pids" ] || return 0
  local name pid left
  # the jobs first, so that no slurmstepd or job process outlives the cluster
  if [ -f "$conf" ] && grep -q "^slurmctld " "$pids" && alive slurmctld "$(awk '$1 == "slurmctld" {print $2}' "$pids")"; then
    local jobs
    jobs="$(SLURM_CONF="$conf" timeout 10 squeue -h -o %A 2>/dev/null | sort -u)"
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      SLURM_CONF="$conf" timeout 10 scancel $jobs 2>/dev/null
      for _ in $(seq 1 20); do
        [ -z "$(SLURM_CONF="$conf" timeout 10 squeue -h -t running,completing -o %A 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  # slurmd, slurmctld, then munged: the reverse of the start order
  tac "$pids" | while read -r name pid; do
    alive "$name" "$pid" && kill -TERM "$pid" 2>/dev/null
  done
  for _ in $(seq 1 20); do
    left=0
    while read -r name pid; do
      alive "$name" "$pid" && left=1
    done <"$pids"
    [ "$left" -eq 0 ] && break
    sleep 0.5
  done
  while read -r name pid; do
    if alive "$name" "$pid"; then
      echo "$PROG: $name ($pid) did not stop on SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
  done <"$pids"
  rm -f "$pids"
}

start_daemon() {  # start_daemon NAME COMMAND...: in the background, in its own session; record its PID
  local name="$1"
  shift
  setsid "$@" </dev/null >>"$log/$name.out" 2>&1 9>&- &   # 9: the start lock, not the daemon's to hold
  local pid=$!
  echo "$name $pid" >>"$pids"
  sleep 0.5
  alive "$name" "$pid" || { stop_recorded; die "$name did not start; see $log/$name.out and $log/$name.log"; }
}

# ---------------------------------------------------------------------------------------------

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get to install them"
  # keep the packages' maintainer scripts from starting the daemons themselves
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
  fi
  local packages=(slurm-wlm munge) ok=0
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${packages[@]}" >"$log/apt.log" 2>&1 && ok=1
  if [ "$ok" -eq 0 ]; then  # stale or missing package lists
    apt-get update -q >>"$log/apt.log" 2>&1 && apt-get install -y -q --no-install-recommends "${packages[@]}" >>"$log/apt.log" 2>&1 && ok=1
  fi
  [ "$own_policy" -eq 1 ] && rm -f "$policy"
  [ "$ok" -eq 1 ] || die "apt-get install slurm-wlm munge failed: $(tail -n 1 "$log/apt.log")"
  command -v slurmctld >/dev/null || die "slurmctld is not on PATH after installing slurm-wlm"
}

munge_works() {
  local socket="$1"
  timeout 5 munge -S "$socket" -n 2>/dev/null | timeout 5 unmunge -S "$socket" >/dev/null 2>&1
}

start_munge() {  # a munged of this cluster's own, on its own socket (AuthInfo=socket=... in slurm.conf)
  local key=/etc/munge/munge.key
  getent passwd munge >/dev/null || die "there is no munge user (is the munge package installed?)"
  # munged refuses directories that others can write to, so its files go in munge's own folders
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s "$key" ]; then
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$key" >/dev/null 2>&1 || die "cannot write the munge key $key"
    else
      dd if=/dev/urandom of="$key" bs=1024 count=1 status=none || die "cannot write the munge key $key"
    fi
  fi
  chown munge:munge "$key" && chmod 0400 "$key"
  rm -f "$munge_socket" "$munge_socket.lock"
  start_daemon munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground --force \
    --socket="$munge_socket" --pid-file="/run/munge/$cluster_id.pid" \
    --log-file="/var/log/munge/$cluster_id.log" --seed-file="/var/lib/munge/$cluster_id.seed"
  for _ in $(seq 1 20); do
    munge_works "$munge_socket" && return 0
    sleep 0.25
  done
  stop_recorded
  die "munged does not answer on $munge_socket; see $log/munged.out and /var/log/munge/$cluster_id.log"
}

free_ports() {  # the first two consecutive TCP ports from 6817 (SLURM's default) that no socket holds
  python3 -c '
import socket

def free(port):
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as SLURM binds: a closed port in TIME_WAIT is free
        try:
            probe.bind(("", port))
        except OSError:
            return False
        return True

port = 6817
while not (free(port) and free(port + 1)):
    port += 2
print(port, port + 1)'
}

write_config() {
  local node host cpus real_memory mem_per_cpu ports
  node="$(slurmd -C 2>/dev/null | head -n 1)"
  case "$node" in
    NodeName=*) ;;
    *) die "slurmd -C did not print the node's topology: $(slurmd -C 2>&1 | head -n 1)" ;;
  esac
  host="$(echo "$node" | sed -n 's/^NodeName=\([^ ]*\).*/\1/p')"
  cpus="$(echo "$node" | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')"
  real_memory="$(echo "$node" | sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p')"
  mem_per_cpu=$(( real_memory / (2 * ${cpus:-1}) ))   # a job without --mem takes half a CPU's share
  [ "$mem_per_cpu" -ge 100 ] || mem_per_cpu=100
  # another test cluster on this host (a second CI run) holds the default ports: take the next free ones
  ports="$(free_ports)" || die "cannot find free TCP ports for slurmctld and slurmd (python3 is needed)"
  mkdir -p "$state/etc"
  cat >"$conf" <<EOF
# Written by scripts/slurm_cluster.sh: a single-node cluster for tests (no accounting, no cgroups).
ClusterName=${cluster_id//-/}
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${ports% *}
SlurmdPort=${ports#* }
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10,socket=$munge_socket
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$log/slurmctld.log
SlurmdLogFile=$log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$mem_per_cpu
EnforcePartLimits=ALL
KillWait=15
InactiveLimit=0
MinJobAge=3600
ReturnToService=2
JobRequeue=0
SlurmctldTimeout=30
SlurmdTimeout=60
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

write_sacct() {
  mkdir -p "$state/bin"
  cat >"$state/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# A stand-in for sacct on a cluster without accounting (scripts/slurm_cluster.sh): answers
# `sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]` (what submitit asks) from squeue,
# which knows ended jobs for MinJobAge seconds. Other fields and options are ignored.
ids=()
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) ids+=("$2"); shift 2 ;;
    -j*) ids+=("${1#-j}"); shift ;;
    --jobs=*) ids+=("${1#--jobs=}"); shift ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
for list in "${ids[@]}"; do
  for id in ${list//,/ }; do
    lines="$(squeue --states=all -h -r -j "$id" -o "%i|%T|%N" 2>/dev/null)"
    if [ -z "$lines" ]; then  # fall back on scontrol (one job)
      lines="$(scontrol -o show job "$id" 2>/dev/null | sed -n 's/.*JobId=\([0-9]*\) .*JobState=\([A-Z_]*\) .* NodeList=\([^ ]*\) .*/\1|\2|\3/p')"
    fi
    [ -n "$lines" ] && echo "$lines" | sed 's/|$/|None assigned/'
  done
done
exit 0
EOF
  chmod 755 "$state/bin/sacct"
}

write_env() {
  cat >"$state/env" <<EOF
# source this file to use the test cluster (scripts/slurm_cluster.sh)
export SLURM_CONF="$conf"
export PATH="$state/bin:\$PATH"
EOF
}

wait_for_node() {
  local node_state=""
  for _ in $(seq 1 $((READY_TIMEOUT * 2))); do
    node_state="$(SLURM_CONF="$conf" timeout 5 sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -n 1)"
    case "$node_state" in idle*) return 0 ;; esac
    recorded_alive || { stop_recorded; die "a daemon stopped while the node came up; see $log/slurmctld.log and $log/slurmd.log"; }
    sleep 0.5
  done
  stop_recorded
  die "the node is not idle after ${READY_TIMEOUT}s (sinfo says: ${node_state:-nothing}); see $log/slurmctld.log and $log/slurmd.log"
}

cluster_start() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (to install packages and start munged, slurmctld and slurmd)"
  mkdir -p "$log" "$state/ctld" "$state/spool" "$state/run"
  if recorded_alive && SLURM_CONF="$conf" timeout 5 sinfo -h >/dev/null 2>&1; then
    echo "$PROG: the cluster of $state is already running" >&2
    return 0
  fi
  stop_recorded  # what is left of an earlier start
  install_packages
  command -v setpriv >/dev/null || die "setpriv (util-linux) is needed to start munged as the munge user"
  # two clusters starting at once would find the same ports free: one chooses and binds at a time
  exec 9>"${TMPDIR:-/tmp}/aomd-slurm-cluster-start.lock" && flock -w 300 9 \
    || die "another test cluster has been starting for 5 minutes (${TMPDIR:-/tmp}/aomd-slurm-cluster-start.lock)"
  write_config
  write_sacct
  write_env
  : >"$pids"
  start_munge
  start_daemon slurmctld slurmctld -D -f "$conf"
  start_daemon slurmd slurmd -D -f "$conf"
  wait_for_node
  flock -u 9 && exec 9>&-
  echo "$PROG: cluster up (partition $PARTITION); . $state/env to use it" >&2
}

case "$action" in
  start) cluster_start ;;
  stop) stop_recorded; echo "$PROG: stopped the cluster of $state" >&2 ;;
  status)
    if recorded_alive; then
      SLURM_CONF="$conf" sinfo
    else
      echo "$PROG: the cluster of $state is not running" >&2
      exit 1
    fi
    ;;
  *) usage ;;
esac
