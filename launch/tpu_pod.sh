#!/usr/bin/env bash
# Train gmflow_jax on a Cloud TPU pod slice through a queued resource.
#
#   launch/tpu_pod.sh [--dry-run] ACTION [ACTION ...]
#   ACTION: create | wait | setup | run | logs | delete | all (= create wait setup run logs)
#
# Settings (environment variables; defaults in brackets):
#   NAME [gmflow-pod]  ZONE [us-east5-a]  PROJECT [gcloud default]  ACCELERATOR [v5p-64]
#   RUNTIME [v2-alpha-tpuv5]  PROVISIONING [spot|best-effort|on-demand; default on-demand]
#   REPO [https://github.com/gmflow-jax/gmflow_jax.git]  BRANCH [main]
#   CONFIG [configs/imagenet256.py]  WORKDIR [gs://$BUCKET/gmflow_imagenet256]  BUCKET [required
#   unless WORKDIR is set]  EXTRA_FLAGS [extra --config.x=y overrides]  JAX_VERSION [0.10.2]
#
# --dry-run prints every command (one per line, prefixed with "+ ") instead of running it.
# The run is preemption-safe: rerunning `run` resumes from the newest checkpoint in WORKDIR.
set -euo pipefail

DRY_RUN=0
ACTIONS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    create|wait|setup|run|logs|delete) ACTIONS+=("$arg") ;;
    all) ACTIONS+=(create wait setup run logs) ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "tpu_pod.sh: unknown argument '$arg' (allowed: --dry-run, create, wait, setup, run, logs, delete, all)" >&2; exit 2 ;;
  esac
done
if [[ ${#ACTIONS[@]} -eq 0 ]]; then
  echo "tpu_pod.sh: no action given (allowed: create, wait, setup, run, logs, delete, all)" >&2
  exit 2
fi

NAME=${NAME:-gmflow-pod}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-64}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
PROVISIONING=${PROVISIONING:-on-demand}
REPO=${REPO:-https://github.com/gmflow-jax/gmflow_jax.git}
BRANCH=${BRANCH:-main}
CONFIG=${CONFIG:-configs/imagenet256.py}
JAX_VERSION=${JAX_VERSION:-0.10.2}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
if [[ -z ${WORKDIR:-} ]]; then
  if [[ -z ${BUCKET:-} ]]; then
    echo "tpu_pod.sh: set WORKDIR (e.g. gs://my-bucket/run1) or BUCKET" >&2
    exit 2
  fi
  WORKDIR=gs://${BUCKET}/gmflow_imagenet256
fi
PROJECT_FLAG=()
[[ -n ${PROJECT:-} ]] && PROJECT_FLAG=(--project "$PROJECT")
case "$PROVISIONING" in
  spot) PROV_FLAG=(--spot) ;;
  best-effort) PROV_FLAG=(--best-effort) ;;
  on-demand) PROV_FLAG=() ;;
  *) echo "tpu_pod.sh: PROVISIONING='$PROVISIONING' (allowed: spot, best-effort, on-demand)" >&2; exit 2 ;;
esac

run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

ssh_all() { run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$1"; }

REMOTE_DIR='$HOME/gmflow_jax'
SETUP_CMD="set -e; if [ ! -d $REMOTE_DIR ]; then git clone --branch $BRANCH $REPO $REMOTE_DIR; fi; cd $REMOTE_DIR && git fetch origin $BRANCH && git checkout $BRANCH && git pull --ff-only origin $BRANCH && python3 -m pip install -U pip && python3 -m pip install -r requirements.txt -e . 'jax[tpu]==$JAX_VERSION' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
RUN_CMD="cd $REMOTE_DIR && nohup python3 -m gmflow_jax.main --config=$CONFIG --workdir=$WORKDIR $EXTRA_FLAGS > \$HOME/gmflow_train.log 2>&1 &"

for action in "${ACTIONS[@]}"; do
  case "$action" in
    create)
      run gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" --zone "$ZONE" \
        "${PROJECT_FLAG[@]}" --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" "${PROV_FLAG[@]}"
      ;;
    wait)
      if [[ $DRY_RUN -eq 1 ]]; then
        run gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --format='value(state.state)'
      else
        until [[ $(gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --format='value(state.state)') == ACTIVE ]]; do
          echo "waiting for queued resource $NAME to become ACTIVE ..."; sleep 30
        done
      fi
      ;;
    setup) ssh_all "$SETUP_CMD" ;;
    run) ssh_all "$RUN_CMD" ;;
    logs) run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=0 --command 'tail -F $HOME/gmflow_train.log' ;;
    delete) run gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --force --quiet ;;
  esac
done
