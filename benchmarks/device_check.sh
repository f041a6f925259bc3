#!/usr/bin/env bash
# The GPU device check (benchmarks/device_check.py): the device, the REPA train step's time,
# MFU and memory for SiT-B/2 and SiT-XL/2, and SDE-250 sampling images/s; under 8 minutes on
# one H200-class GPU. The XLA GPU flags are set by the script before JAX starts.
#
#   bash benchmarks/device_check.sh            # on the GPU machine
#   bash benchmarks/device_check.sh --smoke    # on a CPU: tiny models, a few steps
#   bash benchmarks/device_check.sh --budget-s 300 --json check.json
#
# PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/device_check.py "$@"
