#!/usr/bin/env bash
# GPU check of cmw-vllm: NVML, the torch probe, the estimate and the start preflight on a
# real NVIDIA GPU, with a stand-in engine that holds real GPU memory (tests/gpu/gpufake: its
# `vllm` starts a VLLM::EngineCore child that allocates GPU_GIB GiB with torch). No vLLM is
# needed: a machine with a GPU, python3 with torch and nvidia-ml-py is enough. It installs
# nothing but the wheels in .whl/ (into /tmp/cmw-gpu-site) and takes about a minute.
#
# Checks: `gpus`; `setup --json` (does torch see the GPU); `estimate` of an 8B model (sparse
# files, no disk); a server whose engine holds 6 GiB, matched in `status` and `gpus`; a
# foreign process holding all but 30 GiB, `estimate` and `start` refusing with a hint that
# fits what is free, then `start` with that setting; SIGKILL of the API server and
# `status --json` showing the leftovers' GPU memory; `setup` naming the leftovers;
# `stop --all` freeing the GPU; two 8B servers with `--gpu-memory-utilization auto` packed on
# GPU 0, both healthy, each holding its share and NVML's total within the GPU. Without a GPU
# it runs the steps that need none, says "no GPU" and exits 0.
#
# The wheels such a machine lacks (CPython 3.12), fetched once at the repository root
# (.whl/ is git-ignored: hand it over explicitly, e.g. as a carried path):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
#     python-dotenv==1.2.4
#
# Run (report in $OUT/report.txt, commands' output in $OUT/details.txt; default
# ./gpu-check-report): bash scripts/gpu_check.sh
# Exit status 0 when every step passed. PYTHON picks the interpreter (default python3).
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$REPO/gpu-check-report}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/cmw-gpu-site .whl/*.whl || {
        echo "FAIL cannot install the wheels in .whl/" | tee "$OUT/report.txt"; exit 1; }
    export PYTHONPATH=/tmp/cmw-gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# The stand-in engine runs on the same interpreter (it needs torch there).
export GPUFAKE_PYTHON=$PY
if ! "$PY" -c "import cmw_vllm.cli, pydantic, dotenv, click, psutil" 2> "$OUT/report.txt"; then
    echo "FAIL cmw-vllm cannot be imported: a wheel is missing (see the header)" \
        | tee -a "$OUT/report.txt"
    exit 1
fi
exec "$PY" tests/gpu/gpu_check.py --out "$OUT"
