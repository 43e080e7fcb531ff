#!/usr/bin/env bash
# README Quickstart, command 1: set up (if needed) and run the demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/setup.sh
exec "${PYTHON:-python3}" -m swiftvlm_kernels "$@"
