#!/usr/bin/env bash
# The CPU report in one command (about 30 minutes on 2 cores): the end-to-end prefill of the
# TinyLlama-1.1B-shaped decoder (vanilla / FastV / PDrop / SwiftVLM at budgets 192 and 128, and HF
# transformers' LlavaForConditionalGeneration), the same methods through hf.apply on transformers' LLaVA and
# Qwen2-VL (bench.hf_prefill, with the minimal forward in the same rounds), one decoding step from the
# pruned caches at 64 and 256 new tokens (bench.decode), the ops per stage and the host overhead of an op call,
# and the kernel microbenchmarks of python_ref, the cpu backend and the naive selection (bf16 matmul,
# softmax, torch.topk) at LLaVA-1.5 / NeXT shapes.
# Everything single-threaded; JSON, markdown (report.md) under one folder.
#   bash bench/cpu_report.sh [DIR]      default DIR: bench/results/cpu-<commit>
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
DEST="${1:-bench/results/cpu-$(git rev-parse --short HEAD)}"
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
"$PYTHON" -m bench.host --json "$DEST/host.json" | tee "$DEST/host.log"
"$PYTHON" -m bench.ops --models llava-1.5-7b llava-next-7b --batch 1 --providers eager cpu naive \
    --json "$DEST/ops.json" | tee "$DEST/ops.log"
"$PYTHON" -m bench.prefill --hf --rounds 5 --json "$DEST/prefill.json" | tee "$DEST/prefill.log"
"$PYTHON" -m bench.hf_prefill --rounds 5 --clock thread --json "$DEST/hf_prefill.json" | tee "$DEST/hf_prefill.log"
"$PYTHON" -m bench.decode --rounds 5 --clock thread --json "$DEST/decode.json" | tee "$DEST/decode.log"
"$PYTHON" -m bench.report "$DEST" > /dev/null
echo "report: $DEST/report.md"
