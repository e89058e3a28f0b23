#!/usr/bin/env bash
# Train on every host of a Cloud TPU VM pod slice at once, through `gcloud ... ssh --worker=all`.
#   TPU_NAME=moee-v5p ZONE=us-east5-a PROJECT=my-proj RUN_DIR=gs://my-bucket/runs/sd15 INSTALL=tarball launch/tpu_pod.sh
#   STAGES="vae embedder stage1 stage2" DETACH=1 ... launch/tpu_pod.sh --config.train.batch_size=256
# On TPU, moee's initialize_distributed calls jax.distributed.initialize() with no arguments: each
# host learns its place from the TPU metadata, so every worker runs the same command.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: TPU_NAME=... ZONE=... PROJECT=... RUN_DIR=gs://... launch/tpu_pod.sh [extra `moee train` flags...]

Runs `moee train --config configs/$STAGE.py:$VARIANT --run_dir $RUN_DIR [flags...]` on all
workers of the TPU VM slice $TPU_NAME, optionally installing the project there first.

Required:
  TPU_NAME        the TPU VM (pod slice) name
  ZONE            its zone, e.g. us-east5-a
  PROJECT         its Google Cloud project
  RUN_DIR         gs:// directory for checkpoints and event files, shared by all workers

Training:
  STAGE           vae | embedder | stage1 | stage2 (default stage1)
  STAGES          several stages in order, e.g. "vae embedder stage1 stage2"; overrides STAGE.
                  Each stage is its own `moee train`; a failing stage stops the rest.
  VARIANT         config variant (default sd15)
  REMOTE_ENV      extra environment for the workers: space-separated NAME=VALUE words (values
                  without spaces), e.g. "TPU_STDERR_LOG_LEVEL=0 JAX_TRACEBACK_FILTERING=off"
  DETACH=1        start in the background on each worker (survives a dropped ssh connection);
                  output goes to ~/moee_logs/<time>.log on every worker

Installation (before training; default none):
  INSTALL=git     clone REPO_URL at BRANCH (default main) into REMOTE_DIR on every worker
  INSTALL=tarball pack this checkout (tracked and untracked, not ignored files), copy it to
                  every worker with scp and unpack it into REMOTE_DIR
  INSTALL_ONLY=1  install, then stop
  REMOTE_DIR      checkout directory on the workers (default moee_jax, relative to home)
  REMOTE_VENV     virtualenv on the workers (default moee_venv); the project is installed into
                  it with pip install -e '<REMOTE_DIR>[tpu]'
  REMOTE_PYTHON   Python >= 3.11 on the workers that creates the virtualenv (default python3)

Other:
  DRY_RUN=1       print the gcloud commands instead of running them
  -h, --help      this text
EOF
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac

die() {
  echo "launch/tpu_pod.sh: $*" >&2
  exit 2
}

for name in TPU_NAME ZONE PROJECT RUN_DIR; do
  [[ -n "${!name:-}" ]] || die "$name is not set (see launch/tpu_pod.sh -h)"
done
[[ "$RUN_DIR" == gs://* ]] || die "RUN_DIR=$RUN_DIR must be a gs:// path: every worker writes checkpoints there"

STAGES=${STAGES:-${STAGE:-stage1}}
VARIANT=${VARIANT:-sd15}
INSTALL=${INSTALL:-none}
REMOTE_DIR=${REMOTE_DIR:-moee_jax}
REMOTE_VENV=${REMOTE_VENV:-moee_venv}
REMOTE_PYTHON=${REMOTE_PYTHON:-python3}
BRANCH=${BRANCH:-main}
for stage in $STAGES; do
  case "$stage" in
    vae | embedder | stage1 | stage2) ;;
    *) die "stage '$stage' is not one of: vae embedder stage1 stage2" ;;
  esac
done

# Shell-quote the arguments for the workers' shell, space-separated.
q() {
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}

# A worker path as its shell sees it: relative paths are under the remote home directory.
rpath() {
  if [[ "$1" == /* ]]; then
    q "$1"
  else
    # shellcheck disable=SC2016  # $HOME is for the worker's shell to expand
    printf '"$HOME"/%s' "$(q "$1")"
  fi
}

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    q "$@"
    echo
  else
    "$@"
  fi
}

gcloud_tpu() {
  local verb=$1
  shift
  run gcloud compute tpus tpu-vm "$verb" "$@" --zone "$ZONE" --project "$PROJECT" --worker=all
}

on_all_workers() {
  gcloud_tpu ssh "$TPU_NAME" --command "$1"
}

cd "$(dirname "$0")/.."

dir=$(rpath "$REMOTE_DIR")
venv=$(rpath "$REMOTE_VENV")
make_venv="$(q "$REMOTE_PYTHON") -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
|| { echo 'moee_jax needs Python >= 3.11 on the workers: set REMOTE_PYTHON' >&2; exit 1; }; \
[ -x $venv/bin/pip ] || $(q "$REMOTE_PYTHON") -m venv $venv; \
$venv/bin/pip install --quiet --upgrade pip; \
$venv/bin/pip install --quiet -e $dir'[tpu]'"

case "$INSTALL" in
  none) ;;
  git)
    [[ -n "${REPO_URL:-}" ]] || die "INSTALL=git needs REPO_URL (and BRANCH, default main)"
    on_all_workers "set -e; \
if [ -d $dir/.git ]; then \
git -C $dir fetch --quiet --depth 1 $(q "$REPO_URL") $(q "$BRANCH"); \
git -C $dir checkout --quiet --force FETCH_HEAD; \
else rm -rf $dir; git clone --quiet --depth 1 --branch $(q "$BRANCH") $(q "$REPO_URL") $dir; fi; \
$make_venv"
    ;;
  tarball)
    tarball=$(mktemp "${TMPDIR:-/tmp}/moee_src.XXXXXX")
    trap 'rm -f "$tarball"' EXIT
    git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$tarball"
    gcloud_tpu scp "$tarball" "$TPU_NAME:moee_src.tgz"
    on_all_workers "set -e; rm -rf $dir; mkdir -p $dir; \
tar -xzf moee_src.tgz -C $dir; rm moee_src.tgz; $make_venv"
    ;;
  *) die "INSTALL=$INSTALL must be none, git or tarball" ;;
esac
if [[ "${INSTALL_ONLY:-0}" == 1 ]]; then
  exit 0
fi

env_prefix=""
if [[ -n "${REMOTE_ENV:-}" ]]; then
  read -r -a remote_env <<<"$REMOTE_ENV"
  env_prefix="env $(q "${remote_env[@]}")"
fi
train=""
for stage in $STAGES; do
  train+="$env_prefix $venv/bin/moee train $(q --config "configs/$stage.py:$VARIANT" --run_dir "$RUN_DIR" "$@") || exit \$?; "
done
script="cd $dir && { $train}"

if [[ "${DETACH:-0}" == 1 ]]; then
  log="moee_logs/$(date +%Y%m%d-%H%M%S).log"
  on_all_workers "mkdir -p moee_logs; setsid nohup bash -c $(q "$script") > $log 2>&1 < /dev/null & \
echo \"\$(hostname): started, log ~/$log\""
else
  on_all_workers "$script"
fi
