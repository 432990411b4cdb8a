#!/usr/bin/env bash
# Train gmflow_jax on a Cloud TPU slice through a queued resource, and keep it training.
#
#   launch/tpu_pod.sh [--dry-run] ACTION [ACTION ...]
#   ACTION: create | wait | setup | run | logs | status | delete | supervise
#           all (= create wait setup run logs)
#
#   create     request the queued resource (GA flags: --spot / --guaranteed / --reserved)
#   wait       until it is ACTIVE; exits 3 with a message on FAILED or SUSPENDED
#   setup      on every worker: Python >= 3.11 venv ($VENV) with `pip install -e '.[tpu]'`, the repo at
#              $BRANCH, and (DATA_MODE=mount) a gcsfuse mount of the gs:// data
#   run        on every worker: start the trainer detached; each worker logs to $WORKDIR/logs/
#   logs       follow worker 0's log (every worker's log is also copied to $WORKDIR/logs/)
#   status     the queued resource's state
#   delete     delete the queued resource (and its slice)
#   supervise  create/wait/setup/run, then poll: when the slice is preempted (SUSPENDING, SUSPENDED)
#              or fails (FAILED, gone), delete it, recreate it, set it up and rerun the same command,
#              which resumes from the newest checkpoint in $WORKDIR; a trainer that exits non-zero on
#              an ACTIVE slice is rerun. Stops after $MAX_RETRIES restarts, or when the trainer exits 0.
#
# Settings (environment variables; defaults in brackets):
#   NAME [gmflow-pod]  ZONE [us-east5-a]  PROJECT [gcloud default]  ACCELERATOR [v5p-64]
#   RUNTIME [by ACCELERATOR: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
#            v6e v2-alpha-tpuv6e]
#   PROVISIONING [on-demand | spot | guaranteed | reserved]
#   REPO [https://github.com/gmflow-jax/gmflow_jax.git]  BRANCH [main]  PYTHON [3.11]
#   CONFIG [configs/imagenet256.py]  EXTRA_FLAGS [more --config.x=y overrides]
#   WORKDIR [gs://$BUCKET/gmflow_imagenet256]  BUCKET [required unless WORKDIR is set]
#   DATA [gs:// path of the prepared latents; empty: the config's data.path]
#   DATA_MODE [mount: gcsfuse-mount DATA's bucket at $MOUNT on every worker | direct: pass gs:// on]
#   MOUNT [/mnt/gmflow-data]  VENV [$HOME/gmflow_venv on the workers]
#   LIBTPU_INIT_ARGS [collective overlap flags below]
#   JAX_COMPILATION_CACHE_DIR [$HOME/.cache/gmflow_jax_xla on each worker; a gs:// path needs gcsfs]
#   MAX_RETRIES [5]  POLL_S [120]  WAIT_POLL_S [30]  LOG_SYNC_S [60]
#
# LIBTPU_INIT_ARGS default (XLA:TPU, as MaxText sets for FSDP): async collective fusion (all-gather and
# reduce-scatter of the FSDP-sharded weights and gradients run as async fusions) overlapped with the
# tensor-core compute of neighbouring layers, over several steps of the layer loop, plus the
# data-parallel all-reduce optimization (the pure data axis and multi-slice DCN all-reduces).
#
# --dry-run prints every command (one per line, prefixed with "+ ") instead of running it.
set -euo pipefail

DRY_RUN=0
ACTIONS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    create|wait|setup|run|logs|status|delete|supervise) ACTIONS+=("$arg") ;;
    all) ACTIONS+=(create wait setup run logs) ;;
    -h|--help) sed -n '2,44p' "$0"; exit 0 ;;
    *) echo "tpu_pod.sh: unknown argument '$arg' (allowed: --dry-run, create, wait, setup, run, logs, status, delete, supervise, all)" >&2; exit 2 ;;
  esac
done
if [[ ${#ACTIONS[@]} -eq 0 ]]; then
  echo "tpu_pod.sh: no action given (allowed: create, wait, setup, run, logs, status, delete, supervise, all)" >&2
  exit 2
fi

NAME=${NAME:-gmflow-pod}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-64}
case "$ACCELERATOR" in
  v4-*) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
  v5litepod-*|v5e-*) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  v5p-*) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v6e-*) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  *) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
esac
RUNTIME=${RUNTIME:-$DEFAULT_RUNTIME}
PROVISIONING=${PROVISIONING:-on-demand}
REPO=${REPO:-https://github.com/gmflow-jax/gmflow_jax.git}
BRANCH=${BRANCH:-main}
PYTHON=${PYTHON:-3.11}
CONFIG=${CONFIG:-configs/imagenet256.py}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
DATA=${DATA:-}
DATA_MODE=${DATA_MODE:-mount}
MOUNT=${MOUNT:-/mnt/gmflow-data}
MAX_RETRIES=${MAX_RETRIES:-5}
POLL_S=${POLL_S:-120}
WAIT_POLL_S=${WAIT_POLL_S:-30}
LOG_SYNC_S=${LOG_SYNC_S:-60}
LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS:---xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true --xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true}
if [[ -z ${WORKDIR:-} ]]; then
  if [[ -z ${BUCKET:-} ]]; then
    echo "tpu_pod.sh: set WORKDIR (e.g. gs://my-bucket/run1) or BUCKET" >&2
    exit 2
  fi
  WORKDIR=gs://${BUCKET}/gmflow_imagenet256
fi
if [[ $WORKDIR != gs://* ]]; then
  echo "tpu_pod.sh: WORKDIR='$WORKDIR' must be a gs:// path (every worker writes checkpoints and logs there)" >&2
  exit 2
fi
if [[ -n $DATA && $DATA != gs://* ]]; then
  echo "tpu_pod.sh: DATA='$DATA' must be a gs:// path (the workers read it from the bucket)" >&2
  exit 2
fi
case "$DATA_MODE" in mount|direct) ;; *) echo "tpu_pod.sh: DATA_MODE='$DATA_MODE' (allowed: mount, direct)" >&2; exit 2 ;; esac
if ! [[ $MAX_RETRIES =~ ^[0-9]+$ ]]; then
  echo "tpu_pod.sh: MAX_RETRIES='$MAX_RETRIES' must be an integer >= 0" >&2
  exit 2
fi
PROJECT_FLAG=()
[[ -n ${PROJECT:-} ]] && PROJECT_FLAG=(--project "$PROJECT")
case "$PROVISIONING" in
  spot) PROV_FLAG=(--spot) ;;
  guaranteed) PROV_FLAG=(--guaranteed) ;;
  reserved) PROV_FLAG=(--reserved) ;;
  on-demand) PROV_FLAG=() ;;
  *) echo "tpu_pod.sh: PROVISIONING='$PROVISIONING' (allowed: on-demand, spot, guaranteed, reserved)" >&2; exit 2 ;;
esac

run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

ssh_cmd() {  # ssh_cmd WORKER COMMAND: one command on one worker (0..) or on all of them ("all")
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker="$1" --command "$2"
}

# --- the remote commands (run by bash on every worker) ---------------------------------------------
REMOTE_DIR='$HOME/gmflow_jax'
VENV=${VENV:-'$HOME/gmflow_venv'}
RUN_DIR='$HOME/gmflow_run'
WORKER_ID='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0)'

DATA_FLAG=""
MOUNT_CMD="true"
if [[ -n $DATA ]]; then
  if [[ $DATA_MODE == mount ]]; then
    data_bucket=${DATA#gs://}; data_bucket=${data_bucket%%/*}
    data_rest=${DATA#gs://$data_bucket}
    DATA_FLAG="--config.data.path=$MOUNT$data_rest"
    # gcsfuse from Google's apt repository; read-only, with the kernel's page cache and a metadata cache.
    MOUNT_CMD="if ! mountpoint -q $MOUNT; then if ! command -v gcsfuse >/dev/null; then echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -c -s)' main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi; sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT && gcsfuse --implicit-dirs -o ro --metadata-cache-ttl-secs=-1 $data_bucket $MOUNT; fi"
  else
    DATA_FLAG="--config.data.path=$DATA"
  fi
fi

# Python >= 3.11 through uv (a managed CPython when the image has none; TPU VM images ship 3.10).
SETUP_CMD="set -e; if [ ! -d $REMOTE_DIR ]; then git clone --branch $BRANCH $REPO $REMOTE_DIR; fi; cd $REMOTE_DIR && git fetch origin $BRANCH && git checkout $BRANCH && git pull --ff-only origin $BRANCH && python3 -m pip install --user -q uv && \$HOME/.local/bin/uv venv --allow-existing --python $PYTHON $VENV && \$HOME/.local/bin/uv pip install --python $VENV/bin/python -e '.[tpu]' && $VENV/bin/python -c 'import jax; print(jax.devices())' | head -c 300; $MOUNT_CMD"

# Detached trainer; its exit code lands in $RUN_DIR/exit_code; the log goes to $RUN_DIR/worker-N.log and
# is copied to $WORKDIR/logs/worker-N.log every LOG_SYNC_S seconds and at the end.
TRAIN="$VENV/bin/python -m gmflow_jax.main --config=$CONFIG --workdir=$WORKDIR $DATA_FLAG $EXTRA_FLAGS"
ENV_EXPORTS="export LIBTPU_INIT_ARGS='$LIBTPU_INIT_ARGS' JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-\$HOME/.cache/gmflow_jax_xla} TF_CPP_MIN_LOG_LEVEL=1"
RUN_CMD="set -e; mkdir -p $RUN_DIR; rm -f $RUN_DIR/exit_code; W=$WORKER_ID; LOG=$RUN_DIR/worker-\$W.log; cd $REMOTE_DIR && $ENV_EXPORTS && nohup bash -c \"(while sleep $LOG_SYNC_S; do gcloud storage cp -q \$LOG $WORKDIR/logs/worker-\$W.log; done) & SYNC=\\\$!; $TRAIN; RC=\\\$?; kill \\\$SYNC; gcloud storage cp -q \$LOG $WORKDIR/logs/worker-\$W.log; echo \\\$RC > $RUN_DIR/exit_code\" >> \$LOG 2>&1 < /dev/null &"
POLL_CMD="cat $RUN_DIR/exit_code 2>/dev/null || echo running"

# --- the queued resource ----------------------------------------------------------------------------
create() {
  run gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" --zone "$ZONE" \
    "${PROJECT_FLAG[@]}" --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" "${PROV_FLAG[@]}"
}

delete() {
  run gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --force --quiet
}

state() {  # the queued resource's state, or NOT_FOUND
  gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --format='value(state.state)' 2>/dev/null || echo NOT_FOUND
}

wait_active() {  # 0 when ACTIVE; 3 (with a message) on FAILED, SUSPENDED, SUSPENDING or NOT_FOUND
  if [[ $DRY_RUN -eq 1 ]]; then
    run gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --format='value(state.state)'
    return 0
  fi
  local s
  while true; do
    s=$(state)
    case "$s" in
      ACTIVE) echo "queued resource $NAME is ACTIVE"; return 0 ;;
      FAILED|SUSPENDED|SUSPENDING|NOT_FOUND)
        echo "tpu_pod.sh: queued resource $NAME is $s, it will not become ACTIVE; see: gcloud compute tpus queued-resources describe $NAME --zone $ZONE (then: launch/tpu_pod.sh delete create, or supervise)" >&2
        return 3 ;;
      *) echo "waiting for queued resource $NAME to become ACTIVE (now: ${s:-unknown}) ..."; sleep "$WAIT_POLL_S" ;;
    esac
  done
}

supervise() {
  local restarts=0 s out
  echo "supervise: $NAME, up to $MAX_RETRIES restarts; command: $TRAIN"
  if [[ $DRY_RUN -eq 1 ]]; then
    create; wait_active; ssh_cmd all "$SETUP_CMD"; ssh_cmd all "$RUN_CMD"; ssh_cmd 0 "$POLL_CMD"
    return 0
  fi
  # What the slice needs next: start (first pass: use a slice that is there, else create one),
  # create (delete what is left, create a fresh one), run (rerun on the live slice) or poll.
  local need=start
  while true; do
    if [[ $need == start || $need == create ]]; then
      s=$(state)
      if [[ $need == create || $s == FAILED || $s == SUSPENDED || $s == SUSPENDING ]]; then
        [[ $s == NOT_FOUND ]] || delete
        create
      elif [[ $s == NOT_FOUND ]]; then
        create
      fi
      if wait_active; then
        ssh_cmd all "$SETUP_CMD"
        ssh_cmd all "$RUN_CMD"
        need=poll
      else
        need=lost
      fi
    elif [[ $need == run ]]; then
      ssh_cmd all "$RUN_CMD"
      need=poll
    else
      sleep "$POLL_S"
      s=$(state)
      # A failed describe reads as NOT_FOUND: ask again before treating a transient API error as loss.
      [[ $s == NOT_FOUND ]] && { sleep "$WAIT_POLL_S"; s=$(state); }
      case "$s" in
        ACTIVE)
          out=$(gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=0 --command "$POLL_CMD" 2>/dev/null | tail -n 1 || echo unreachable)
          case "$out" in
            0) echo "supervise: the trainer finished (exit 0) after $restarts restarts"; return 0 ;;
            running|unreachable|"") continue ;;
            *) echo "supervise: the trainer exited with status $out on an ACTIVE slice"; need=rerun ;;
          esac ;;
        FAILED|SUSPENDED|SUSPENDING|NOT_FOUND|DELETING)
          echo "supervise: queued resource $NAME is $s (preempted or failed)"; need=lost ;;
        *) continue ;;
      esac
    fi
    if [[ $need == lost || $need == rerun ]]; then
      if (( restarts >= MAX_RETRIES )); then
        echo "tpu_pod.sh: supervise: retry limit reached ($MAX_RETRIES restarts); the queued resource $NAME is left as it is, the checkpoints are in $WORKDIR" >&2
        return 4
      fi
      restarts=$((restarts + 1))
      if [[ $need == lost ]]; then
        echo "supervise: restart $restarts of $MAX_RETRIES: delete, recreate, set up and rerun (resumes from $WORKDIR)"
        need=create
      else
        echo "supervise: restart $restarts of $MAX_RETRIES: rerun on the same slice (resumes from $WORKDIR)"
        need=run
      fi
    fi
  done
}

for action in "${ACTIONS[@]}"; do
  case "$action" in
    create) create ;;
    wait) wait_active || exit 3 ;;
    setup) ssh_cmd all "$SETUP_CMD" ;;
    run) ssh_cmd all "$RUN_CMD" ;;
    logs) ssh_cmd 0 "tail -F $RUN_DIR/worker-0.log" ;;
    status) if [[ $DRY_RUN -eq 1 ]]; then wait_active; else state; fi ;;
    delete) delete ;;
    supervise) supervise || exit $? ;;
  esac
done
