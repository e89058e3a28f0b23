#!/usr/bin/env bash
# Run a `moee` subcommand on this machine inside the project's virtualenv (created if missing).
#   launch/local.sh demo --config configs/backbone.py:tiny
#   launch/local.sh convert --unet sd15/unet --vae sd15/vae --motion_adapter mm.safetensors --out ckpt/sd15
#   launch/local.sh train --config configs/stage1.py:tiny --run_dir runs/tiny
# NPROC=N starts N processes of one multi-process JAX run on 127.0.0.1, to exercise multi-host code
# on one machine (each process finds its place through MOEE_* variables, see usage below).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: [NPROC=N] [DEVICES_PER_PROC=K] launch/local.sh <moee subcommand> [flags...]

Runs `moee <subcommand> [flags...]` from the project's virtualenv (.venv, created by
`make` if missing).

  launch/local.sh train --config configs/stage1.py:tiny --run_dir runs/tiny
  NPROC=2 JAX_PLATFORMS=cpu DEVICES_PER_PROC=4 launch/local.sh train --config configs/stage1.py:tiny --run_dir runs/mp

Environment:
  NPROC                   processes to start (default 1). With N > 1, process i gets
                          MOEE_COORDINATOR_ADDRESS=127.0.0.1:<port>, MOEE_NUM_PROCESSES=N and
                          MOEE_PROCESS_ID=i, which moee's initialize_distributed reads; if one
                          process fails, the others are stopped.
  MOEE_COORDINATOR_PORT   coordinator port for NPROC > 1 (default: a free port)
  DEVICES_PER_PROC        devices per process for NPROC > 1: with JAX_PLATFORMS=cpu, K fake CPU
                          devices each (--xla_force_host_platform_device_count=K); otherwise
                          accelerators i*K .. i*K+K-1 for process i (JAX_LOCAL_DEVICE_IDS).
                          Default: CPU processes have 1 device; accelerators are not divided.
  MOEE_BIN                the moee executable (default: .venv/bin/moee, set up by make)
EOF
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
if [[ -z "${MOEE_BIN:-}" ]]; then
  make --no-print-directory .venv/.installed
  MOEE_BIN=.venv/bin/moee
fi

NPROC=${NPROC:-1}
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: NPROC=$NPROC must be a positive integer" >&2
  exit 2
fi
if ((NPROC == 1)); then
  exec "$MOEE_BIN" "$@"
fi

if [[ -n "${DEVICES_PER_PROC:-}" ]] && ! [[ "$DEVICES_PER_PROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: DEVICES_PER_PROC=$DEVICES_PER_PROC must be a positive integer" >&2
  exit 2
fi
port=${MOEE_COORDINATOR_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; wait; exit 143' TERM
trap 'stop_all; wait; exit 130' INT

for ((i = 0; i < NPROC; i++)); do
  (
    export MOEE_COORDINATOR_ADDRESS="127.0.0.1:$port" MOEE_NUM_PROCESSES="$NPROC" MOEE_PROCESS_ID="$i"
    if [[ -n "${DEVICES_PER_PROC:-}" ]]; then
      if [[ "${JAX_PLATFORMS:-}" == cpu ]]; then
        export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROC"
      else
        export JAX_LOCAL_DEVICE_IDS
        JAX_LOCAL_DEVICE_IDS=$(seq -s, $((i * DEVICES_PER_PROC)) $((i * DEVICES_PER_PROC + DEVICES_PER_PROC - 1)))
      fi
    fi
    exec "$MOEE_BIN" "$@"
  ) &
  pids+=("$!")
done
echo "launch/local.sh: $NPROC processes (pids ${pids[*]}), coordinator 127.0.0.1:$port" >&2

# Poll rather than `wait -n`: a process that exits before `wait -n` is reached can go unreported on
# a loaded machine, and the others would then run on alone.
status=0
declare -A finished=()
while ((${#finished[@]} < NPROC)); do
  for pid in "${pids[@]}"; do
    [[ -n "${finished[$pid]:-}" ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    code=0
    wait "$pid" || code=$?
    finished[$pid]=1
    if ((code != 0)); then
      status=$code
      echo "launch/local.sh: a process exited with status $status; stopping the others" >&2
      stop_all
      wait || true
      exit "$status"
    fi
  done
  sleep 0.2
done
exit "$status"
