#!/usr/bin/env bash
# Run N flaxtrain processes on this machine as one multi-process JAX job.
# Run `scripts/local_multiprocess.sh --help` for the full usage.
set -euo pipefail

PROG=${0##*/}

usage() {
  cat <<EOF
Usage: $PROG [--logdir=DIR] [--port=PORT] [--grace-period=SECONDS] N [FLAXTRAIN_ARGS...]

Start N flaxtrain processes on this machine, coordinated through 127.0.0.1,
as one multi-process JAX job (a local stand-in for a multi-host run). Process
I (0 <= I < N) is started as

  \$FLAXTRAIN FLAXTRAIN_ARGS... --coordinator_address=127.0.0.1:PORT \\
      --num_processes=N --process_id=I

Arguments:
  N                      Number of processes (a positive integer).
  FLAXTRAIN_ARGS...      Passed unchanged to every process, e.g.
                         --config=configs/fashion_cnn.py --workdir=runs/mp.
                         Every process gets the same --workdir.

Options (before N):
  --logdir=DIR           Write process I's stdout+stderr to DIR/process_I.log
                         (DIR is created) instead of printing it here with a
                         "[pI] " prefix on every line.
  --port=PORT            Coordinator port (default: a free port, found by
                         binding port 0 on 127.0.0.1).
  --grace-period=SECONDS After SIGTERM, how long processes get to exit (e.g.
                         to save a checkpoint) before SIGKILL (default: 60).
  -h, --help             Show this help.

Behaviour:
  - Waits for all processes. Exits 0 if all exit 0.
  - If one process fails (non-zero exit), the others get SIGTERM (then SIGKILL
    after the grace period) and this script exits with the failed process's
    status.
  - On Ctrl-C, SIGTERM or SIGHUP, every process gets SIGTERM (so flaxtrain's
    preemption handling can checkpoint), the script waits for them as above
    and exits with 128+signal (130, 143, 129). A second Ctrl-C sends SIGKILL.
    No process is left running when this script exits.

Environment:
  FLAXTRAIN    Command to run, split like a shell command line (quotes are
               honoured), e.g. FLAXTRAIN="python -m flaxtrain.main" or
               FLAXTRAIN="env TF_CPP_MIN_LOG_LEVEL=3 flaxtrain". It is started
               with exec, so signals reach it directly. Default: flaxtrain if
               it is on PATH, else python -m flaxtrain.main.
  XLA_FLAGS    Passed through to every process. On CPU, give each process
               several fake devices with
               XLA_FLAGS=--xla_force_host_platform_device_count=K
               (then the job has N*K devices).
  JAX_PLATFORMS  E.g. cpu, to force the CPU backend on a GPU/TPU machine.

Examples:
  XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
    $PROG 2 --config=configs/fashion_cnn.py --workdir=runs/ft_mp
  $PROG --logdir=runs/ft_logs 4 --config=configs/fashion_cnn.py \\
    --workdir=runs/ft_mp4 --config.num_epochs=1
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

log() {
  printf '[%s] %s\n' "$PROG" "$*" >&2
}

# ----------------------------------------------------------------- arguments
# Internal variables are lowercase and never exported, so that the processes'
# environment is exactly the caller's.
declare +x logdir port grace n python cmd pids prefixers running fail_rc signal_rc stop_at tmp out pid rc i
logdir="" port="" grace=60
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --logdir=*) logdir=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --grace-period=*) grace=${1#*=} ;;
    --logdir | --port | --grace-period)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case $1 in
        --logdir) logdir=$2 ;;
        --port) port=$2 ;;
        --grace-period) grace=$2 ;;
      esac
      shift
      ;;
    --) shift; break ;;
    -*) die "unknown option $1 (options go before N; flaxtrain flags after N)" ;;
    *) break ;;
  esac
  shift
done

(($#)) || die "missing N, the number of processes (see --help)"
n=$1
shift
[[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$n'"
[[ $grace =~ ^[0-9]+$ ]] || die "--grace-period must be a whole number of seconds, got '$grace'"
if [[ -n $logdir ]]; then
  mkdir -p "$logdir" || die "cannot create --logdir '$logdir'"
fi

python=""
for candidate in python3 python; do
  if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
done

if [[ -z $port ]]; then
  [[ -n $python ]] || die "python not found to pick a free port: pass --port=PORT"
  port=$("$python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()') || die "could not find a free port: pass --port=PORT"
fi
if ! [[ $port =~ ^[1-9][0-9]*$ ]] || ((port > 65535)); then
  die "--port must be 1-65535, got '$port'"
fi

if [[ -n ${FLAXTRAIN:-} ]]; then
  cmd=$FLAXTRAIN
elif command -v flaxtrain >/dev/null 2>&1; then
  cmd=flaxtrain
elif command -v python >/dev/null 2>&1; then
  cmd="python -m flaxtrain.main"
else
  [[ -n $python ]] || die "neither flaxtrain nor python is on PATH: set FLAXTRAIN"
  cmd="$python -m flaxtrain.main"
fi

# ------------------------------------------------------------------ children
pids=()      # pids[i]: pid of process i; "" once it has been reaped
prefixers=() # pids of the "[pI] " prefixing readers
running=0
fail_rc=0    # exit status of the first process that failed
signal_rc=0  # 128+signal if we were interrupted
stop_at=-1   # $SECONDS at which survivors get SIGKILL; -1 = not stopping
tmp=""

# Process I: exec the command so that its pid is the one we signal. It ignores
# SIGINT/SIGHUP (a terminal's Ctrl-C or hangup reaches the whole process group):
# this script turns those into one SIGTERM, flaxtrain's graceful-stop signal.
launch() {
  local i=$1
  shift
  trap '' INT HUP
  set -- "$@" "--coordinator_address=127.0.0.1:$port" "--num_processes=$n" "--process_id=$i"
  eval "exec $cmd \"\$@\""
}

prefix_lines() { # ends at EOF, i.e. once its process (and any child) has exited
  local line
  trap '' INT HUP TERM
  while IFS= read -r line || [[ -n $line ]]; do
    printf '%s%s\n' "$1" "$line"
  done
}

signal_all() { # signal_all SIGNAL
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    if [[ -n $pid ]]; then kill "-$1" "$pid" 2>/dev/null || true; fi
  done
}

stop_all() { # SIGTERM everyone now, SIGKILL after the grace period
  if ((stop_at < 0)); then
    stop_at=$((SECONDS + grace))
    signal_all TERM
  fi
}

on_signal() { # on_signal NAME NUMBER
  if ((signal_rc)); then
    log "received SIG$1 again: killing all processes"
    signal_all KILL
    return
  fi
  signal_rc=$((128 + $2))
  log "received SIG$1: sending SIGTERM to $running running process(es) (grace period ${grace}s)"
  stop_all
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM HUP
  signal_all KILL # only processes still running, i.e. if this script itself failed
  for pid in ${pids[@]+"${pids[@]}"}; do
    if [[ -n $pid ]]; then wait "$pid" 2>/dev/null || true; fi
  done
  # Let the prefixers print what is left in the pipes (at most ~5s).
  local deadline=$((SECONDS + 5))
  for pid in ${prefixers[@]+"${prefixers[@]}"}; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1 || true; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  [[ -z $tmp ]] || rm -rf "$tmp"
  exit "$rc"
}

trap cleanup EXIT
trap 'on_signal INT 2' INT
trap 'on_signal TERM 15' TERM
trap 'on_signal HUP 1' HUP

log "starting $n process(es), coordinator 127.0.0.1:$port, command: $cmd"
if [[ -z $logdir ]]; then
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/local_multiprocess.XXXXXX")
fi
for ((i = 0; i < n; i++)); do
  if [[ -n $logdir ]]; then
    out="$logdir/process_$i.log"
    log "process $i: log $out"
  else
    out="$tmp/p$i"
    mkfifo "$out"
    prefix_lines "[p$i] " <"$out" &
    prefixers+=($!)
  fi
  launch "$i" "$@" >"$out" 2>&1 &
  pids+=($!)
  running=$((running + 1))
done

# ------------------------------------------------------------------- monitor
while ((running > 0)); do
  for ((i = 0; i < n; i++)); do
    pid=${pids[i]}
    [[ -n $pid ]] || continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" 2>/dev/null || rc=$?
    pids[i]=""
    running=$((running - 1))
    if ((rc != 0 && fail_rc == 0 && stop_at < 0)); then
      fail_rc=$rc
      log "process $i (pid $pid) exited with status $rc: stopping the other $running process(es)"
      stop_all
    elif ((rc != 0)); then
      log "process $i (pid $pid) exited with status $rc"
    fi
  done
  if ((stop_at >= 0 && SECONDS >= stop_at && running > 0)); then
    log "grace period over: killing $running process(es)"
    signal_all KILL
    stop_at=$((SECONDS + 3600))
  fi
  ((running == 0)) || sleep 0.2 || true # sleep dies too on a terminal Ctrl-C
done

if ((signal_rc)); then
  exit "$signal_rc"
fi
if ((fail_rc)); then
  exit "$fail_rc"
fi
log "all $n process(es) finished successfully"
