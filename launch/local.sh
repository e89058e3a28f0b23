#!/usr/bin/env bash
# Run a `moee` subcommand on this machine inside the project's virtualenv (created if missing).
#   launch/local.sh demo --config configs/backbone.py:tiny
#   launch/local.sh convert --unet sd15/unet --vae sd15/vae --motion_adapter mm.safetensors --out ckpt/sd15
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory .venv/.installed
exec .venv/bin/moee "$@"
