#!/usr/bin/env bash
# Create a Cloud TPU VM (or queued resource), install flaxtrain on every worker,
# run training on all workers at once, stream logs, and tear it all down.
# Run `scripts/tpu_vm.sh --help` for the full usage.
set -euo pipefail

PROG=${0##*/}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
GCLOUD=${GCLOUD:-gcloud}
POLL_SECONDS=${TPU_VM_POLL_SECONDS:-30}
DEFAULT_DATA_MOUNT=/mnt/flaxtrain-data

usage() {
  cat <<EOF
Usage: $PROG ACTION --name=NAME --zone=ZONE --project=PROJECT [OPTIONS] [-- FLAXTRAIN_FLAGS...]

Manage a Cloud TPU VM slice and run flaxtrain on all of its workers.

Actions:
  create    Create the TPU VM (or, with --queued, a queued resource) and wait
            until it is READY. Reuses an existing one with the same name.
  install   On every worker: create a venv and pip install 'flaxtrain[tpu]'
            from --source, replacing an installed flaxtrain even of the same
            version; with --data-bucket, also install gcsfuse and mount the
            bucket read-only.
  run       Start flaxtrain on all workers at once, in the background (nohup).
            Each worker logs to ~/flaxtrain-run/logs/worker_<N>.log.
            With --follow, stream worker 0's log and wait for all workers.
  up        create + install + run (takes the options of all three).
  logs      Stream worker 0's log (or --worker=N, or --worker=all with a
            "[wN] " prefix per line) until training ends.
  wait      Wait until flaxtrain has exited on every worker; exit non-zero if
            it failed on any worker.
  stop      Send SIGTERM to flaxtrain on every worker (it can checkpoint and
            exit, as on preemption).
  status    Show the TPU (and queued resource) state and whether flaxtrain is
            running on each worker.
  delete    Delete the TPU VM, or with --queued the queued resource and its
            TPU VM.

Where the TPU is (all actions):
  --name=NAME             TPU VM name (also the queued resource id with
                          --queued): lowercase letters, digits and '-'.
  --zone=ZONE             Zone, e.g. us-central2-b. Default: \$CLOUDSDK_COMPUTE_ZONE.
  --project=PROJECT       Project id. Default: \$CLOUDSDK_CORE_PROJECT.
  --queued                Use a queued resource (gcloud compute tpus
                          queued-resources): create waits in the queue until
                          capacity is available; delete removes the queued
                          resource and its TPU. Pass it to every action that
                          creates, inspects or deletes the TPU.

Creating (create, up):
  --tpu-type=TYPE         Accelerator type, e.g. v4-8, v4-32, v5litepod-64,
                          v5p-128, v6e-16. Required. Also used by run to tell
                          single-host (<= 8) from multi-host slices.
  --runtime-version=VER   TPU software version. Default by generation:
                          v2/v3/v4: tpu-ubuntu2204-base,
                          v5litepod: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
                          v6e: v2-alpha-tpuv6e. Required for other generations.
  --spot                  Spot capacity: much cheaper, can be preempted at any
                          time (works with and without --queued).
  --best-effort           Best-effort tier of a queued resource (implies
                          --queued; uses 'gcloud alpha'). Can be preempted.
  --service-account=EMAIL Service account of the VMs (default: the Compute
                          Engine default account). It needs read access to
                          --data-dir / --data-bucket and write access to
                          --workdir.
  --no-wait               Do not wait for the TPU to become READY.

Installing (install, up):
  --source=PATH_OR_URL    What to pip install on the workers:
                            a local project directory: built into a wheel here
                            (pip wheel) and copied to every worker (scp);
                            a local .whl / .tar.gz / .zip: copied as is;
                            a git URL (git+https://..., https://...git,
                            git@host:org/repo.git, optionally @REF): pip
                            installs it on the workers directly;
                            an https URL of a .whl/.tar.gz: installed directly.
                          Default: this checkout ($REPO_ROOT).
  --venv=PATH             venv on the workers (default: ~/flaxtrain-venv).
  --python=PYTHON         Interpreter on the workers used to create the venv
                          (default: python3.11; flaxtrain needs Python >= 3.11
                          and the Ubuntu 22.04 TPU images ship 3.10). If it
                          is missing, PYTHON and PYTHON-venv are apt-installed.

Running (run, up):
  --workdir=DIR           Checkpoint/metrics directory, passed as --workdir.
                          Required; must be gs://BUCKET/... on a multi-host
                          slice (every host writes the same checkpoints),
                          unless --shared-fs.
  --data-dir=DIR          TFDS data dir, passed as --config.dataset.data_dir.
                          Must be gs://... on a multi-host slice, unless
                          --shared-fs. Default: flaxtrain's default (each
                          worker downloads its own).
                          TFDS's TFRecord data (read through tf.data) can be
                          read from gs:// directly this way. ArrayRecord data
                          (the streaming input, dataset.source=stream) is
                          read by random access from a local file system:
                          use --data-bucket instead.
  --shared-fs             --workdir and --data-dir may be absolute paths on a
                          file system that every worker mounts at the same
                          path (e.g. a Filestore NFS share) instead of gs://.
                          flaxtrain checks at start-up that all workers see
                          the same workdir.
  --config=FILE[:ARGS]    Local config file; copied to every worker. Default:
                          configs/fashion_cnn.py (relative to the current
                          directory, else to this checkout).
  --follow                After starting, stream worker 0's log until it
                          ends, then wait for all workers; exit with their
                          status.
  --teardown              Implies --follow. Delete the TPU VM / queued resource
                          when this command ends: after training succeeds or
                          fails, and also on error or Ctrl-C.
  -- FLAXTRAIN_FLAGS...   Everything after '--' is passed to flaxtrain, e.g.
                          -- --config.num_epochs=3 --config.batch_size=512

Data on GCS for the streaming input (install, run, up):
  --data-bucket=gs://BUCKET[/PREFIX]
                          Bucket holding prepared TFDS datasets (PREFIX: the
                          TFDS data dir inside it, e.g. gs://my-bucket/tfds).
                          install: on every worker, apt-install gcsfuse (if
                          missing) and mount it read-only at --data-mount
                          (only PREFIX, with --only-dir), with metadata
                          caching for ArrayRecord's many small random reads;
                          skipped where it is already mounted.
                          run: check that it is mounted and start flaxtrain
                          with TFDS_DATA_DIR=<--data-mount>, unless the
                          flaxtrain flags set --config.dataset.data_dir.
                          Not together with --data-dir.
  --data-mount=PATH       Absolute mount point on the workers (default:
                          $DEFAULT_DATA_MOUNT). 'run --data-mount=PATH'
                          without --data-bucket uses what install mounted
                          there.

Logs (logs):
  --worker=N|all          Which worker's log (default: 0).
  --lines=N               Start with the last N lines (default: 100).
  --no-follow             Print the last lines and exit instead of streaming.

General:
  --dry-run               Print the commands (gcloud, pip wheel) instead of
                          running them; same input, same output. Waiting for
                          READY is printed as a '#' comment with the command
                          that would be polled.
  -h, --help              Show this help.

Environment: GCLOUD (gcloud command, default: gcloud), TPU_VM_POLL_SECONDS
(seconds between state checks while waiting, default: 30).

Examples:
  $PROG up --name=ft-v4 --zone=us-central2-b --project=my-proj \\
      --tpu-type=v4-32 --workdir=gs://my-bucket/runs/v4 \\
      --data-dir=gs://my-bucket/tfds --follow -- --config.num_epochs=10
  $PROG up --name=ft-v4 --zone=us-central2-b --project=my-proj \\
      --tpu-type=v4-32 --workdir=gs://my-bucket/runs/in1k \\
      --data-bucket=gs://my-bucket/tfds --config=configs/imagenet_resnet50.py
  $PROG up --queued --spot --teardown --name=ft-v5e --zone=us-west4-a \\
      --project=my-proj --tpu-type=v5litepod-16 --workdir=gs://my-bucket/runs/v5e
  $PROG logs --name=ft-v4 --zone=us-central2-b --project=my-proj --worker=all
  $PROG delete --name=ft-v4 --zone=us-central2-b --project=my-proj
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

log() {
  printf '[%s] %s\n' "$PROG" "$*" >&2
}

# Shell-quote one word; words made only of safe characters stay bare.
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Print a command line; --flag=value words are printed as --flag=<quoted value>.
print_cmd() {
  local out="" word
  for word in "$@"; do
    if [[ $word =~ ^(--[a-z0-9-]+=)(.*)$ ]]; then
      out+="${BASH_REMATCH[1]}$(q "${BASH_REMATCH[2]}") "
    else
      out+="$(q "$word") "
    fi
  done
  printf '%s\n' "${out% }"
}

# Run a command, or print it with --dry-run.
run_cmd() {
  if ((DRY_RUN)); then
    print_cmd "$@"
  else
    "$@"
  fi
}

# ----------------------------------------------------------------- arguments
ACTION="" NAME="" ZONE=${CLOUDSDK_COMPUTE_ZONE:-} PROJECT=${CLOUDSDK_CORE_PROJECT:-}
TPU_TYPE="" RUNTIME_VERSION="" QUEUED=0 SPOT=0 BEST_EFFORT=0 SERVICE_ACCOUNT=""
# shellcheck disable=SC2088 # "~" is expanded on the workers, not here
NO_WAIT=0 SOURCE="" VENV="~/flaxtrain-venv" PYTHON=python3.11 WORKDIR="" DATA_DIR=""
CONFIG="" FOLLOW=0 TEARDOWN=0 WORKER=0 LINES=100 LOG_FOLLOW=1 DRY_RUN=0
DATA_BUCKET="" DATA_MOUNT="" SHARED_FS=0
EXTRA_FLAGS=()

need_value() {
  [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"
}

while (($#)); do
  arg=$1
  value=""
  if [[ $arg == --*=* ]]; then
    value=${arg#*=}
    arg=${arg%%=*}
    has_value=1
  else
    has_value=0
  fi
  case $arg in
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA_FLAGS=("$@"); break ;;
    --queued | --spot | --best-effort | --no-wait | --follow | --teardown | --no-follow | --dry-run | --shared-fs)
      ((has_value == 0)) || die "$arg takes no value"
      case $arg in
        --queued) QUEUED=1 ;;
        --spot) SPOT=1 ;;
        --best-effort) BEST_EFFORT=1 ;;
        --no-wait) NO_WAIT=1 ;;
        --follow) FOLLOW=1 ;;
        --teardown) TEARDOWN=1 ;;
        --no-follow) LOG_FOLLOW=0 ;;
        --dry-run) DRY_RUN=1 ;;
        --shared-fs) SHARED_FS=1 ;;
      esac
      ;;
    --name | --zone | --project | --tpu-type | --runtime-version | --service-account | \
      --source | --venv | --python | --workdir | --data-dir | --data-bucket | --data-mount | \
      --config | --worker | --lines)
      if ((has_value == 0)); then
        need_value "$@"
        value=$2
        shift
      fi
      [[ -n $value ]] || die "$arg needs a non-empty value"
      case $arg in
        --name) NAME=$value ;;
        --zone) ZONE=$value ;;
        --project) PROJECT=$value ;;
        --tpu-type) TPU_TYPE=$value ;;
        --runtime-version) RUNTIME_VERSION=$value ;;
        --service-account) SERVICE_ACCOUNT=$value ;;
        --source) SOURCE=$value ;;
        --venv) VENV=$value ;;
        --python) PYTHON=$value ;;
        --workdir) WORKDIR=$value ;;
        --data-dir) DATA_DIR=$value ;;
        --data-bucket) DATA_BUCKET=$value ;;
        --data-mount) DATA_MOUNT=$value ;;
        --config) CONFIG=$value ;;
        --worker) WORKER=$value ;;
        --lines) LINES=$value ;;
      esac
      ;;
    -*) die "unknown option $arg (see --help)" ;;
    *)
      [[ -z $ACTION ]] || die "unexpected argument '$arg' (one action only; flaxtrain flags go after --)"
      ACTION=$arg
      ;;
  esac
  shift
done

# ---------------------------------------------------------------- validation
[[ -n $ACTION ]] || die "missing ACTION: create, install, run, up, logs, wait, stop, status or delete (see --help)"
case $ACTION in
  create | install | run | up | logs | wait | stop | status | delete) ;;
  *) die "unknown action '$ACTION': use create, install, run, up, logs, wait, stop, status or delete" ;;
esac
does() { [[ " $* " == *" $ACTION "* ]]; }

[[ -n $NAME ]] || die "--name is required"
[[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  die "--name '$NAME' is invalid: use lowercase letters, digits and '-', start with a letter, at most 63 characters"
[[ -n $ZONE ]] || die "--zone is required (or set CLOUDSDK_COMPUTE_ZONE)"
[[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' is not a zone like us-central2-b"
[[ -n $PROJECT ]] || die "--project is required (or set CLOUDSDK_CORE_PROJECT)"
[[ $PROJECT =~ ^([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] || die "--project '$PROJECT' is not a valid project id"

if ((BEST_EFFORT)); then
  ((SPOT == 0)) || die "--spot and --best-effort are mutually exclusive"
  QUEUED=1
fi
if ((TEARDOWN)); then
  does run up || die "--teardown only applies to run and up"
  FOLLOW=1
fi
if ((FOLLOW)); then does run up || die "--follow only applies to run and up (use the logs action)"; fi
if ((${#EXTRA_FLAGS[@]})); then does run up || die "flaxtrain flags after -- only apply to run and up"; fi
if ((SHARED_FS)); then does run up || die "--shared-fs only applies to run and up"; fi
for flag in "${EXTRA_FLAGS[@]}"; do
  [[ $flag != --config && $flag != --config=* ]] ||
    die "pass the config file as --config=FILE before '--' (the script copies it to every worker), not after it"
done

# Accelerator type -> generation, chip/core count and default runtime version.
GENERATION="" TPU_SIZE=0
if [[ -n $TPU_TYPE ]]; then
  [[ $TPU_TYPE =~ ^([a-z][a-z0-9]*)-([1-9][0-9]*)$ ]] ||
    die "--tpu-type '$TPU_TYPE' is invalid: expected GENERATION-SIZE such as v4-32 or v5litepod-64"
  GENERATION=${BASH_REMATCH[1]}
  TPU_SIZE=${BASH_REMATCH[2]}
fi
if does create up; then
  [[ -n $TPU_TYPE ]] || die "--tpu-type is required to $ACTION (e.g. v4-32, v5litepod-64)"
  if [[ -z $RUNTIME_VERSION ]]; then
    case $GENERATION in
      v2 | v3 | v4) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
      v5litepod | v5e) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      v5p) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v6e) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      *) die "no default --runtime-version for TPU generation '$GENERATION': pass --runtime-version" ;;
    esac
  fi
  [[ $RUNTIME_VERSION =~ ^[A-Za-z0-9._-]+$ ]] || die "--runtime-version '$RUNTIME_VERSION' is invalid"
fi
# Slices of up to 8 chips/cores (v4-8, v5litepod-8, v6e-8, ...) have one host.
MULTI_HOST=1
if [[ -n $TPU_TYPE ]] && ((TPU_SIZE <= 8)); then MULTI_HOST=0; fi

if [[ -n $SERVICE_ACCOUNT ]]; then
  [[ $SERVICE_ACCOUNT =~ ^[^@[:space:]]+@[^@[:space:]]+$ ]] || die "--service-account '$SERVICE_ACCOUNT' is not an email address"
fi
if does logs; then
  [[ $WORKER =~ ^(all|0|[1-9][0-9]*)$ ]] || die "--worker must be a worker number or 'all', got '$WORKER'"
  [[ $LINES =~ ^(0|[1-9][0-9]*)$ ]] || die "--lines must be a non-negative integer, got '$LINES'"
fi
[[ $VENV =~ ^[A-Za-z0-9_./~-]+$ ]] || die "--venv '$VENV' may only contain letters, digits and _ . / ~ -"
[[ $PYTHON =~ ^[A-Za-z0-9_./-]+$ ]] || die "--python '$PYTHON' is not a command name or path"

GS_RE='^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9](/.*)?$'
CONFIG_FILE="" CONFIG_ARGS=""
if does run up; then
  [[ -n $WORKDIR ]] || die "--workdir is required to $ACTION (e.g. gs://BUCKET/runs/NAME)"
  if [[ $WORKDIR == gs://* ]]; then
    [[ $WORKDIR =~ $GS_RE ]] || die "--workdir '$WORKDIR' is not a valid gs://BUCKET/PATH URL"
  elif ((SHARED_FS)); then
    [[ $WORKDIR == /* ]] || die "--workdir '$WORKDIR' must be an absolute path with --shared-fs (the same on every worker)"
  elif ((MULTI_HOST)); then
    if [[ -n $TPU_TYPE ]]; then
      die "--workdir must be gs://BUCKET/... on multi-host $TPU_TYPE (all hosts share checkpoints), got '$WORKDIR'; on a file system every worker mounts, add --shared-fs"
    fi
    die "--workdir must be gs://BUCKET/... (all hosts share checkpoints); for a single-host slice pass --tpu-type to allow a local path"
  fi
  if [[ -n $DATA_DIR ]]; then
    if [[ $DATA_DIR == gs://* ]]; then
      [[ $DATA_DIR =~ $GS_RE ]] || die "--data-dir '$DATA_DIR' is not a valid gs://BUCKET/PATH URL"
    elif ((SHARED_FS)); then
      [[ $DATA_DIR == /* ]] || die "--data-dir '$DATA_DIR' must be an absolute path with --shared-fs (the same on every worker)"
    elif ((MULTI_HOST)); then
      die "--data-dir must be gs://BUCKET/... on a multi-host slice (every host reads it), got '$DATA_DIR'; on a file system every worker mounts, add --shared-fs"
    fi
  fi
  CONFIG=${CONFIG:-configs/fashion_cnn.py}
  CONFIG_FILE=$CONFIG
  if [[ $CONFIG =~ ^(.*\.py)(:.*)$ ]]; then
    CONFIG_FILE=${BASH_REMATCH[1]}
    CONFIG_ARGS=${BASH_REMATCH[2]}
  fi
  if [[ ! -f $CONFIG_FILE && $CONFIG_FILE != /* && -f $REPO_ROOT/$CONFIG_FILE ]]; then
    CONFIG_FILE=$REPO_ROOT/$CONFIG_FILE
  fi
  [[ -f $CONFIG_FILE ]] || die "--config file '$CONFIG_FILE' not found (it is copied to every worker)"
  CONFIG_FILE=$(cd "$(dirname "$CONFIG_FILE")" && pwd)/$(basename "$CONFIG_FILE")
fi

# Data bucket -> gcsfuse mount (install), TFDS_DATA_DIR=<mount> (run).
DATA_BUCKET_NAME="" DATA_PREFIX=""
if [[ -n $DATA_BUCKET || -n $DATA_MOUNT ]]; then
  does install run up || die "--data-bucket and --data-mount only apply to install, run and up"
fi
if [[ -n $DATA_BUCKET ]]; then
  [[ $DATA_BUCKET =~ ^gs://([a-z0-9][-a-z0-9_.]*[a-z0-9])(/[A-Za-z0-9_.~=+@,/-]*)?$ ]] ||
    die "--data-bucket '$DATA_BUCKET' is not a gs://BUCKET[/PREFIX] URL"
  DATA_BUCKET_NAME=${BASH_REMATCH[1]}
  DATA_PREFIX=${BASH_REMATCH[2]}
  while [[ $DATA_PREFIX == /* ]]; do DATA_PREFIX=${DATA_PREFIX#/}; done
  while [[ $DATA_PREFIX == */ ]]; do DATA_PREFIX=${DATA_PREFIX%/}; done
  [[ -z $DATA_DIR ]] ||
    die "--data-dir and --data-bucket both set the TFDS data dir: use --data-dir for gs:// TFRecord data, --data-bucket for ArrayRecord (streaming) data"
  DATA_MOUNT=${DATA_MOUNT:-$DEFAULT_DATA_MOUNT}
elif [[ -n $DATA_MOUNT ]]; then
  does run || die "--data-mount needs --data-bucket to $ACTION (it is where the bucket is mounted)"
  [[ -z $DATA_DIR ]] || die "--data-dir and --data-mount both set the TFDS data dir: pass one of them"
fi
if [[ -n $DATA_MOUNT ]]; then
  [[ $DATA_MOUNT =~ ^(/[A-Za-z0-9_.-]+)+/?$ ]] ||
    die "--data-mount '$DATA_MOUNT' must be an absolute path of letters, digits and _ . - (e.g. $DEFAULT_DATA_MOUNT)"
  DATA_MOUNT=${DATA_MOUNT%/}
fi

# Source: local dir -> wheel; local archive -> as is; URL -> pip installs it remotely.
SOURCE_KIND="" PIP_REQUIREMENT=""
if does install up; then
  SOURCE=${SOURCE:-$REPO_ROOT}
  if [[ $SOURCE =~ ^git\+ ]]; then
    SOURCE_KIND=url PIP_REQUIREMENT="flaxtrain[tpu] @ $SOURCE"
  elif [[ $SOURCE =~ ^https?://.*\.(whl|tar\.gz|zip)$ ]]; then
    SOURCE_KIND=url PIP_REQUIREMENT="flaxtrain[tpu] @ $SOURCE"
  elif [[ $SOURCE =~ ^(https?|ssh|git)://[^[:space:]]+$ ]]; then
    SOURCE_KIND=url PIP_REQUIREMENT="flaxtrain[tpu] @ git+$SOURCE"
  elif [[ $SOURCE =~ ^git@([^:/[:space:]]+):([^[:space:]]+)$ ]]; then
    SOURCE_KIND=url PIP_REQUIREMENT="flaxtrain[tpu] @ git+ssh://git@${BASH_REMATCH[1]}/${BASH_REMATCH[2]}"
  elif [[ $SOURCE =~ ^[a-z][a-z0-9+.-]*:// ]]; then
    die "--source '$SOURCE' is not supported: use a local path, a git URL or an https URL of a wheel/sdist"
  elif [[ -d $SOURCE ]]; then
    [[ -f $SOURCE/pyproject.toml || -f $SOURCE/setup.py ]] ||
      die "--source directory '$SOURCE' has no pyproject.toml or setup.py"
    SOURCE_KIND="dir"
    SOURCE=$(cd "$SOURCE" && pwd)
  elif [[ -f $SOURCE ]]; then
    [[ $SOURCE =~ \.(whl|tar\.gz|zip)$ ]] || die "--source file '$SOURCE' is not a .whl, .tar.gz or .zip"
    SOURCE_KIND="file"
    SOURCE=$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE")
  else
    die "--source '$SOURCE' is neither an existing path nor a git/https URL"
  fi
fi

if ((DRY_RUN == 0)) && ! command -v "$GCLOUD" >/dev/null 2>&1; then
  die "'$GCLOUD' not found: install the Google Cloud SDK (https://cloud.google.com/sdk) or use --dry-run"
fi

# ------------------------------------------------------------------- gcloud
LOC=(--zone="$ZONE" --project="$PROJECT")
TPU_VM=(compute tpus tpu-vm)
QR=(compute tpus queued-resources)

# Remote (worker-side) snippets, run by the workers' login shell: the $-expressions
# in single quotes below are expanded there, not here.
# shellcheck disable=SC2016,SC2088
remote_path() { # ~/x -> "$HOME"/x ; anything else quoted
  if [[ $1 == "~" ]]; then
    printf '"$HOME"'
  elif [[ $1 == "~/"* ]]; then
    printf '"$HOME"/%s' "$(q "${1#"~/"}")"
  else
    q "$1"
  fi
}
R_VENV=$(remote_path "$VENV")
# shellcheck disable=SC2016
R_RUN='"$HOME"/flaxtrain-run'
# shellcheck disable=SC2016
R_DIST='"$HOME"/flaxtrain-dist'
# shellcheck disable=SC2016
R_WORKER='W=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || hostname | sed -n "s/.*-w-\([0-9][0-9]*\)\$/\1/p"); W=${W:-0}'

ssh_all() { # ssh_all WORKER COMMAND
  run_cmd "$GCLOUD" "${TPU_VM[@]}" ssh "$NAME" "${LOC[@]}" --worker="$1" --command="$2"
}

scp_all() { # scp_all LOCAL_FILE REMOTE_PATH
  run_cmd "$GCLOUD" "${TPU_VM[@]}" scp "$1" "$NAME:$2" "${LOC[@]}" --worker=all
}

# Poll DESCRIBE_CMD... until it prints READY_STATE; fail on FAIL_RE.
poll_state() { # poll_state READY_STATE FAIL_RE WHAT DESCRIBE_CMD...
  local ready=$1 fail_re=$2 what=$3 state err failures=0
  shift 3
  if ((DRY_RUN)); then
    printf '# poll every %ss until it prints %s:\n# %s\n' "$POLL_SECONDS" "$ready" "$(print_cmd "$@")"
    return
  fi
  while :; do
    if state=$("$@" 2>"$POLL_ERR"); then
      failures=0
      [[ $state == "$ready" ]] && { log "$what is $ready"; return; }
      [[ $state =~ $fail_re ]] && die "$what is in state $state"
    else
      err=$(tail -n 1 "$POLL_ERR")
      ((++failures < 5)) || die "cannot get the state of $what: $err"
      state="unknown ($err)"
    fi
    log "waiting for $what to be $ready (state: ${state:-unknown})"
    sleep "$POLL_SECONDS"
  done
}
POLL_ERR=$(mktemp "${TMPDIR:-/tmp}/tpu_vm_err.XXXXXX")
trap 'rm -f "$POLL_ERR"' EXIT

exists() { # exists DESCRIBE_CMD...: 0 if the resource exists (never with --dry-run)
  ((DRY_RUN == 0)) && "$@" --format='value(name)' >/dev/null 2>&1
}

# ------------------------------------------------------------------ actions
do_create() {
  local flags=(--accelerator-type="$TPU_TYPE")
  if ((SPOT)); then flags+=(--spot); fi
  flags+=(--scopes=https://www.googleapis.com/auth/cloud-platform)
  if [[ -n $SERVICE_ACCOUNT ]]; then flags+=(--service-account="$SERVICE_ACCOUNT"); fi
  if ((QUEUED)); then
    local gcloud=("$GCLOUD")
    if ((BEST_EFFORT)); then
      gcloud+=(alpha)
      flags+=(--best-effort)
    fi
    if exists "$GCLOUD" "${QR[@]}" describe "$NAME" "${LOC[@]}"; then
      log "queued resource $NAME already exists; not creating it"
    else
      run_cmd "${gcloud[@]}" "${QR[@]}" create "$NAME" "${LOC[@]}" --node-id="$NAME" \
        --runtime-version="$RUNTIME_VERSION" "${flags[@]}"
    fi
    ((NO_WAIT)) && return
    poll_state ACTIVE '^(FAILED|SUSPENDING|SUSPENDED|DELETING)$' "queued resource $NAME" \
      "$GCLOUD" "${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)'
  else
    if exists "$GCLOUD" "${TPU_VM[@]}" describe "$NAME" "${LOC[@]}"; then
      log "TPU VM $NAME already exists; not creating it"
    else
      run_cmd "$GCLOUD" "${TPU_VM[@]}" create "$NAME" "${LOC[@]}" --version="$RUNTIME_VERSION" "${flags[@]}"
    fi
    ((NO_WAIT)) && return
  fi
  poll_state READY '^(PREEMPTED|TERMINATED|STOPPED|STOPPING|DELETING|HIDDEN)$' "TPU VM $NAME" \
    "$GCLOUD" "${TPU_VM[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)'
}

do_install() {
  local vpy="$R_VENV/bin/python" pkg setup
  # Create the venv; if that fails (no such python, or no ensurepip), apt-get
  # install PYTHON and PYTHON-venv and retry.
  local apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
  setup="set -eu; if [ ! -x $vpy ]; then $PYTHON -m venv $R_VENV || { $apt update -q && $apt install -y -q ${PYTHON##*/} ${PYTHON##*/}-venv && rm -rf $R_VENV && $PYTHON -m venv $R_VENV; }; fi; $vpy -m pip install -q --upgrade pip"
  if [[ $SOURCE_KIND == url ]]; then
    pkg=$(q "$PIP_REQUIREMENT")
  else
    local file=$SOURCE
    if [[ $SOURCE_KIND == dir ]]; then
      local stage="${TMPDIR:-/tmp}/flaxtrain-tpu-vm-$NAME"
      run_cmd rm -rf "$stage"
      run_cmd python3 -m pip wheel -q --no-deps --wheel-dir="$stage" "$SOURCE"
      if ((DRY_RUN)); then
        file="$stage/flaxtrain-*.whl"
      else
        local wheels=("$stage"/flaxtrain-*.whl)
        [[ -f ${wheels[0]} ]] || die "pip wheel did not produce $stage/flaxtrain-*.whl"
        file=${wheels[0]}
      fi
    fi
    setup+="; rm -rf $R_DIST; mkdir -p $R_DIST"
    pkg="\"\$(ls -d $R_DIST/* | head -n 1)[tpu]\""
  fi
  ssh_all all "$setup"
  if [[ $SOURCE_KIND != url ]]; then
    scp_all "$file" "flaxtrain-dist/"
  fi
  # pip keeps an installed flaxtrain of the same version (a rebuilt wheel of an edited
  # checkout, a git branch that moved on): uninstall it first, so that the new one is used.
  ssh_all all "set -eu; if $vpy -m pip show -q flaxtrain >/dev/null 2>&1; then $vpy -m pip uninstall -q -y flaxtrain; fi; $vpy -m pip install -q $pkg; $vpy -c 'import flaxtrain; print(\"flaxtrain\", flaxtrain.__version__, \"installed\")'"
  if [[ -n $DATA_BUCKET ]]; then mount_data; fi
}

# Mount --data-bucket read-only at --data-mount on every worker with gcsfuse.
# ArrayRecord files (the streaming input) are read by random access, which needs a
# POSIX path, not gs://. MaxText's docs (Grain pipeline) recommend reading ArrayRecord
# through Cloud Storage FUSE with metadata caching, which speeds up random access, and
# an 'ls -R' of the mount to pre-fill that cache: unlimited TTL and cache sizes, as the
# data does not change during training. The 'ls -R' runs once, in the background,
# right after mounting.
mount_data() {
  local apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
  local src="gs://$DATA_BUCKET_NAME${DATA_PREFIX:+/$DATA_PREFIX}" flags
  flags="--implicit-dirs -o ro --metadata-cache-ttl-secs=-1 --stat-cache-max-size-mb=-1 --type-cache-max-size-mb=-1"
  if [[ -n $DATA_PREFIX ]]; then flags+=" --only-dir=$(q "$DATA_PREFIX")"; fi
  ssh_all all "set -eu; $R_WORKER; M=$(q "$DATA_MOUNT"); if ! command -v gcsfuse >/dev/null 2>&1; then echo \"deb [signed-by=/usr/share/keyrings/gcsfuse.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/gcsfuse.asc >/dev/null; $apt update -q; $apt install -y -q gcsfuse; fi; if mountpoint -q \"\$M\"; then echo \"worker \$W: \$M is already mounted (from \$(findmnt -n -o SOURCE \"\$M\" || echo ?)); to mount $src there instead, first run: sudo umount \$M\"; else sudo mkdir -p \"\$M\"; sudo chown \"\$(id -u):\$(id -g)\" \"\$M\"; gcsfuse $flags $(q "$DATA_BUCKET_NAME") \"\$M\"; nohup ls -R \"\$M\" >/dev/null 2>&1 </dev/null & echo \"worker \$W: mounted $src read-only at \$M\"; fi"
}

do_run() {
  local base args
  base=$(basename "$CONFIG_FILE")
  args="--config=$R_RUN/configs/$(q "$base$CONFIG_ARGS") --workdir=$(q "$WORKDIR")"
  if [[ -n $DATA_DIR ]]; then args+=" --config.dataset.data_dir=$(q "$DATA_DIR")"; fi
  local flag env="" check="" hint=${DATA_BUCKET:-gs://BUCKET/PREFIX}
  for flag in "${EXTRA_FLAGS[@]}"; do args+=" $(q "$flag")"; done
  # --data-bucket / --data-mount: TFDS finds its data in the gcsfuse mount, unless
  # the flaxtrain flags name a data dir themselves.
  if [[ -n $DATA_MOUNT ]]; then
    if [[ " ${EXTRA_FLAGS[*]} " == *" --config.dataset.data_dir"[=\ ]* ]]; then
      log "--config.dataset.data_dir is among the flaxtrain flags: not setting TFDS_DATA_DIR=$DATA_MOUNT"
    else
      env="TFDS_DATA_DIR=$(q "$DATA_MOUNT") "
      check=" if ! mountpoint -q $(q "$DATA_MOUNT"); then echo \"worker \$W: $DATA_MOUNT is not mounted; mount the data bucket with: $PROG install --data-bucket=$hint --data-mount=$DATA_MOUNT\" >&2; exit 1; fi;"
    fi
  fi

  # 1. Refuse if training is already running anywhere; create the run directory.
  ssh_all all "set -eu; $R_WORKER; R=$R_RUN; mkdir -p \"\$R/logs\" \"\$R/configs\"; if [ -f \"\$R/flaxtrain.pid\" ] && kill -0 \"\$(cat \"\$R/flaxtrain.pid\")\" 2>/dev/null; then echo \"worker \$W: flaxtrain is already running (pid \$(cat \"\$R/flaxtrain.pid\")); stop it first with: $PROG stop\" >&2; exit 1; fi;$check"
  # 2. Copy the config to every worker.
  scp_all "$CONFIG_FILE" "flaxtrain-run/configs/$base"
  # 3. Start flaxtrain everywhere in the background; the wrapper records its exit status.
  ssh_all all "set -eu; $R_WORKER; R=$R_RUN; LOG=\"\$R/logs/worker_\$W.log\"; rm -f \"\$R/exit_code\"; ${env}PYTHONUNBUFFERED=1 nohup sh -c 'f=\$1; shift; trap : TERM INT; \"\$@\"; echo \$? > \"\$f\"' sh \"\$R/exit_code\" $R_VENV/bin/flaxtrain $args > \"\$LOG\" 2>&1 < /dev/null & echo \$! > \"\$R/flaxtrain.pid\"; echo \"worker \$W: started flaxtrain (pid \$!), log: \$LOG\""
  if ((FOLLOW)); then
    ((TEARDOWN)) || log "training runs in the background: Ctrl-C only stops following (resume with: $PROG logs ...)"
    WORKER=0 LOG_FOLLOW=1
    do_logs || true
    do_wait
  else
    log "started; follow with: $PROG logs --name=$NAME --zone=$ZONE --project=$PROJECT [--worker=all]"
  fi
}

do_logs() {
  local tail_cmd="tail -n $LINES"
  if ((LOG_FOLLOW)); then tail_cmd+=" -F --pid=\"\$(cat \"\$R/flaxtrain.pid\" 2>/dev/null || echo 1)\""; fi
  # --pid makes tail stop once flaxtrain has exited on that worker.
  local cmd="$R_WORKER; R=$R_RUN; LOG=\"\$R/logs/worker_\$W.log\"; [ -f \"\$LOG\" ] || { echo \"worker \$W: no log yet (\$LOG); start training with: $PROG run\" >&2; exit 1; }; "
  if [[ $WORKER == all ]]; then
    cmd+="$tail_cmd \"\$LOG\" | sed -u \"s/^/[w\$W] /\""
  else
    cmd+="$tail_cmd \"\$LOG\""
  fi
  ssh_all "$WORKER" "$cmd"
}

do_wait() {
  ssh_all all "$R_WORKER; R=$R_RUN; [ -f \"\$R/flaxtrain.pid\" ] || { echo \"worker \$W: flaxtrain was never started\" >&2; exit 1; }; while kill -0 \"\$(cat \"\$R/flaxtrain.pid\")\" 2>/dev/null; do sleep 10; done; code=\$(cat \"\$R/exit_code\" 2>/dev/null || echo 255); echo \"worker \$W: flaxtrain exited with status \$code\"; exit \"\$code\""
}

do_stop() {
  ssh_all all "$R_WORKER; R=$R_RUN; pid=\$(cat \"\$R/flaxtrain.pid\" 2>/dev/null || true); if [ -n \"\$pid\" ] && kill -0 \"\$pid\" 2>/dev/null; then pkill -TERM -P \"\$pid\" || true; echo \"worker \$W: sent SIGTERM to flaxtrain\"; else echo \"worker \$W: flaxtrain is not running\"; fi"
}

do_status() {
  local state
  if ((QUEUED)); then
    run_cmd "$GCLOUD" "${QR[@]}" describe "$NAME" "${LOC[@]}" --format='table(name.basename(),state.state)'
  fi
  run_cmd "$GCLOUD" "${TPU_VM[@]}" describe "$NAME" "${LOC[@]}" --format='table(name.basename(),acceleratorType,state,health)'
  if ((DRY_RUN == 0)); then
    state=$("$GCLOUD" "${TPU_VM[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)')
    [[ $state == READY ]] || return 0
  fi
  ssh_all all "$R_WORKER; R=$R_RUN; pid=\$(cat \"\$R/flaxtrain.pid\" 2>/dev/null || true); if [ -z \"\$pid\" ]; then echo \"worker \$W: flaxtrain not started\"; elif kill -0 \"\$pid\" 2>/dev/null; then echo \"worker \$W: flaxtrain running (pid \$pid)\"; else echo \"worker \$W: flaxtrain exited with status \$(cat \"\$R/exit_code\" 2>/dev/null || echo unknown)\"; fi"
}

do_delete() {
  if ((QUEUED)); then
    run_cmd "$GCLOUD" "${QR[@]}" delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run_cmd "$GCLOUD" "${TPU_VM[@]}" delete "$NAME" "${LOC[@]}" --quiet
  fi
}

teardown() {
  local rc=$?
  trap - EXIT INT TERM
  rm -f "$POLL_ERR"
  log "--teardown: deleting $NAME"
  do_delete || { log "deleting $NAME failed: delete it with: $PROG delete --name=$NAME --zone=$ZONE --project=$PROJECT$( ((QUEUED)) && printf ' --queued')"; rc=1; }
  exit "$rc"
}

if ((TEARDOWN)); then
  trap teardown EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
fi

case $ACTION in
  create) do_create ;;
  install) do_install ;;
  run) do_run ;;
  up) do_create; do_install; do_run ;;
  logs) do_logs ;;
  wait) do_wait ;;
  stop) do_stop ;;
  status) do_status ;;
  delete) do_delete ;;
esac
