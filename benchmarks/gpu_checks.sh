#!/usr/bin/env bash
# The GPU measurements issues 11 and 12 still owe, as one prepared script for a lent GPU machine that has no network
# (../shared/docs/gpu.md). It has two halves:
#
#   bash benchmarks/gpu_checks.sh prepare     # here, where pip reaches PyPI, in the project's environment: fills .gpu/
#   bash benchmarks/gpu_checks.sh run         # there, from the repository root, with .gpu/ carried (git-ignored; 4 MB, 29 MB with LOCKED=1)
#
# `prepare` downloads the wheels the GPU image lacks (hydra-core, omegaconf, gguf, and antlr4, built from its sdist),
# saves the offline default's tokenizer (SmolLM2's, 49,152 tokens) for the random-weight models, and writes a text
# file for GPT-J's and GPT-NeoX-20B's statistics (sampling text from their random models would take most of a call,
# minutes for NeoX's 20 B). With LOCKED=1 it also brings the locked transformers and what it needs, so `run` can use
# the locked set instead of the image's.
#
# `run` installs the wheels into /tmp/site, then runs each step with its own timeout (what is left of BUDGET seconds,
# at most each step's own limit), writing each step's log (its tables at the end) and a summary into $OUT (default
# /tmp/gpu-checks). Steps (STEPS,
# space-separated; by default the first four, which fit one 10-minute call, and pbf16 is a second call's):
#   lu      C's factors alone at GPT-J's and NeoX's d_ff, float64 and float32: the memory they hold, and the peak above
#           that while factoring and while solving (a workspace or a copy there is held six times by GPT-J's MEMIT)
#   smol    SmolLM2-135M shape, ROME and MEMIT, plain and SADR, one case at a time: SADR's s/step ratio (≤ 1.3×)
#   gptj    GPT-J-6B shape, float32 and TF32, MEMIT and ROME, plain and SADR, one case at a time: SADR's ratio
#           (≤ 1.15×), the TF32 MEMIT peak, statistics tokens/s (≥ 20,000), TF32's decisions against float32's per prompt
#   neox    GPT-NeoX-20B shape in bfloat16, ROME one case at a time, C's factors on the host (float64) and on the
#           GPU in float32: peaks (≤ 48 GB), and the decisions of the two compared per prompt
#   pbf16   GPT-J-6B shape in bfloat16, ROME and MEMIT, 16 cases, N = 1 and 8 side by side: cases/s (≥ 3×), decisions
#   alpha   SmolLM2-135M shape, AlphaEdit plain and SADR: its null-space projection and updates on the GPU, the one
#           editor the other steps leave out (optional, for a call with time left)
#   fluency GPT-J-6B shape, fluency's reference-style texts (100 tokens, all 3 prompts of 4 offline records): one batch
#           per prompt (before 2026-12-06) against a case's prompts and all cases' prompts in one batch (optional)
# Rehearse on the CPU first, with tiny widths and the same code: TINY=1 OUT=/tmp/gpu-rehearsal bash benchmarks/gpu_checks.sh run
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu

prepare() {
  set -e
  rm -rf "$GPU/whl" && mkdir -p "$GPU/whl"  # one version of each wheel, or the install there stops
  # the GPU image has transformers 5.17, the oldest tested set; LOCKED=1 brings the locked set's
  local lock=sadr/constraints/oldest.txt
  [ "${LOCKED:-0}" = 1 ] && lock=sadr/constraints/locked.txt
  pins() { for name in "$@"; do grep -i -E "^${name//[-_]/[-_]}==" "$lock"; done; }
  local platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
                  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  pip download -q --no-deps "${platform[@]}" -d "$GPU/whl" $(pins hydra-core omegaconf gguf)
  pip wheel -q --no-deps -w "$GPU/whl" $(pins antlr4-python3-runtime)  # published as an sdist only
  if [ "${LOCKED:-0}" = 1 ]; then
    pip download -q --no-deps "${platform[@]}" -d "$GPU/whl" \
      $(pins transformers huggingface_hub tokenizers safetensors hf-xet httpx2 httpcore2 truststore kernels tomlkit)
  fi
  python benchmarks/scale_bench.py --save-tokenizer "$GPU/tok"
  python - "$GPU/stats.txt" <<'EOF'
import json, sys
from importlib import resources
# every string of the packaged offline records, mixed into 200 texts of over 256 tokens
texts = []
for file in sorted(resources.files("sadr").joinpath("data", "offline").iterdir()):
    if file.name.endswith(".json"):
        def strings(node):
            if isinstance(node, str):
                yield node
            elif isinstance(node, dict):
                for value in node.values():
                    yield from strings(value)
            elif isinstance(node, list):
                for value in node:
                    yield from strings(value)
        texts += [s for s in strings(json.loads(file.read_text())) if len(s) > 20 and "{}" not in s]
line = lambda i: " ".join(texts[(i * 37 + j) % len(texts)] for j in range(40))
open(sys.argv[1], "w").write("\n\n".join(line(i) for i in range(200)) + "\n")  # texts apart by blank lines
EOF
  du -sh "$GPU"
}

step() {  # $1: name, $2: its own limit in seconds, then the command
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  limit=$((limit * SLOWER))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then echo "=== $name: skipped, $left s of the budget left" | tee -a "$OUT/summary.md"; return; fi
  echo "=== $name (limit $limit s) at $(date -u +%T)"
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  rm -rf "$WORK" "$SADR_CACHE_DIR"  # a model folder and its statistics: GPT-J's and NeoX's together overflow a 64 GB disk
  echo "=== $name: exit $rc after $SECONDS s" | tee -a "$OUT/summary.md"
  tail -n 40 "$OUT/$name.log"
}

run_checks() {
  OUT=${OUT:-/tmp/gpu-checks}
  WORK=/tmp/gpu-checks-work
  BUDGET=${BUDGET:-540}
  mkdir -p "$OUT"
  if [ -d "$GPU/whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU"/whl/*.whl || exit
    export PYTHONPATH=/tmp/site:$PWD
  fi
  # caches (GBs of statistics) stay outside $OUT, whose files come back (8 at most): one log per step and a summary
  export PYTHONUNBUFFERED=1 SADR_CACHE_DIR=/tmp/gpu-checks-cache
  rm -rf "$WORK" "$SADR_CACHE_DIR"  # what a run stopped before its step's end left (another model's runs)
  python3 -c "import torch, transformers; print('torch', torch.__version__, '/ transformers', transformers.__version__, '/',
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/summary.md"
  git log -1 --format='code %h %s' 2>/dev/null | tee -a "$OUT/summary.md"
  local scale=(python3 benchmarks/scale_bench.py --workdir "$WORK" --tokenizer "$GPU/tok" --delta-steps 20)
  local pcases=(python3 benchmarks/parallel_cases_bench.py --device cuda --model gpt-j --random-shape)
  local fluency=(python3 benchmarks/fluency_bench.py --device cuda --model gpt-j --random-shape)
  local factors=(python3 benchmarks/factor_memory_bench.py)
  SLOWER=1
  if [ "${TINY:-0}" = 1 ]; then  # 3 δ steps, and 2-core CPUs take longer than the GPU
    scale=(python3 benchmarks/scale_bench.py --workdir "$WORK" --tiny)
    pcases=(python3 benchmarks/parallel_cases_bench.py --device cpu --model gpt-j --random-shape --tiny)
    fluency=(python3 benchmarks/fluency_bench.py --device cpu --model gpt-j --random-shape --tiny)
    factors=(python3 benchmarks/factor_memory_bench.py --tiny)
    SLOWER=3
  fi
  for name in ${STEPS:-lu smol gptj neox}; do
    case $name in
      lu) step lu 60 "${factors[@]}" ;;
      smol) step smol 120 "${scale[@]}" --arch smollm2-135m --editors rome memit ;;
      # MEMIT first: its pass over layers 3-8 also gives ROME's layer 5; and the statistics read 128 texts of the
      # prepared file rather than sampling them (the 2026-12-05 run, ROME first, sampled 4 corpora of 36-42 s each and
      # ran out of its 300 s in MEMIT): the pass's tokens/s are the same either way
      gptj) step gptj 300 "${scale[@]}" --arch gpt-j --dtype float32 --editors memit rome \
              --stats-samples 128 --stats-text-file "$PWD/$GPU/stats.txt" --variants "" tf32=true ;;
      neox) step neox 240 "${scale[@]}" --arch gpt-neox-20b --dtype bfloat16 --editors rome --records 2 \
              --stats-samples 200 --stats-text-file "$PWD/$GPU/stats.txt" \
              --variants model.stats.factor_device=cpu model.stats.factor_dtype=float32 ;;
      pbf16) step pbf16 240 "${pcases[@]}" --dtype bfloat16 --editors rome memit --n 1 8 --cases 16 \
               --stats-samples 128 --set editor.v_num_grad_steps=10 ;;
      alpha) step alpha 120 "${scale[@]}" --arch smollm2-135m --editors alphaedit ;;
      fluency) step fluency 150 "${fluency[@]}" --cases 4 --prompts-per-case 0 --rounds 1 ;;
      *) echo "unknown step $name (lu smol gptj neox pbf16 alpha fluency)"; exit 2 ;;
    esac
  done
  cat "$OUT/summary.md"
}

case ${1:-} in
  prepare) prepare ;;
  run) run_checks ;;
  *) echo "usage: bash benchmarks/gpu_checks.sh prepare|run (see the comment at its top)"; exit 2 ;;
esac
