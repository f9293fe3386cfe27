#!/usr/bin/env bash
# The GPU session for issue #5 (AOTInductor engines, one CUDA graph, GPU benchmark), stage by stage.
#
# The device machine (nvidia-h100-x1 / nvidia-h200): Python 3.12, torch 2.11 + CUDA 13, no network,
# no diffusers. 15 minutes of device time per session (was 30; machine start counts), 10 minutes per
# command: every stage below is
# one `run` call, each ends well inside 10 minutes (a `timeout` inside kills the bench and still
# returns what it measured), results accumulate in $WORK on the machine while it stays warm, and
# every stage returns gpu_bench.json/.md/.png + its log in $OUT.
#
# ---------------------------------------------------------------------------------------------
# HERE, once, in the repo root (the dev machine; pip works here, not there):
#
#   echo /.whl/ >> .git/info/exclude; echo /.gpu-bench/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 onnx_graphsurgeon==0.6.1 onnxconverter-common==1.16.0
#
# Wheels to carry (6.5 MB together, all pure Python), checked against the image's package list
# (/work/.library/device/KINDS.md) and each wheel's Requires-Dist:
#   diffusers 0.42.1          (6.3 MB) needs importlib_metadata, filelock, huggingface-hub>=1.32,<3,
#                             numpy, regex, requests, safetensors>=0.8, Pillow: all on the image
#                             (huggingface-hub 1.33.0, safetensors 0.8.0) except importlib_metadata,
#                             which diffusers imports only on Python < 3.8: not needed.
#   onnx_graphsurgeon 0.6.1   (59 kB) needs ml-dtypes, numpy, onnx>=1.14: on the image. Used by the
#                             real ONNX export the gpu tests make of the tiny model.
#   onnxconverter-common 1.16 (90 kB) needs numpy, onnx, packaging, protobuf: on the image. Only for
#                             fp16 ONNX exports (the onnxruntime rows, if onnxruntime-gpu is ever there).
#   dfosd itself is not installed: the repo root (the package) is put on PYTHONPATH as `dfosd`
#   through a symlink. The image's onnxruntime is the CPU build: the onnxruntime rows are skipped
#   with a note (an onnxruntime-gpu wheel is ~250 MB, over the 64 MiB a call can carry).
#
# THERE: one `run` per stage, each with carry [".whl"], in this order (most important first;
# estimated minutes in brackets, machine start not counted; stop when the device time runs out; with
# 15 minutes, plan on check + eager + aoti1 and leave the rest to the next session):
#   bash bench/gpu_session.sh check      [3-5] versions, TensorRT probe, pytest -m gpu (tiny: cuda
#                                              AOTI packages, one CUDA graph, parity; fp32 and fp16)
#   bash bench/gpu_session.sh eager      [2-3] eager fp32/fp16 at batch 1,4,8 + fp32 references
#   bash bench/gpu_session.sh aoti1      [3-6] AOTI fp16 build + one-graph/no-graph rows, batch 1
#   bash bench/gpu_session.sh aoti8      [4-7] same at batch 8, then the 2048² tiled rows
#   bash bench/gpu_session.sh compile    [5-9] torch.compile(mode="max-autotune") fp16, batch 1
#   bash bench/gpu_session.sh aoti4      [3-6] AOTI at batch 4
#   bash bench/gpu_session.sh ort              onnxruntime rows (skipped unless the CUDA EP exists)
# If the machine went cold between calls (idle > 30 s), $WORK is gone: a stage then rebuilds what it
# needs (references, packages) itself, only slower. Results of separate machines merge HERE:
#   python -m dfosd.bench.gpu_bench --merge a/gpu_bench.json b/gpu_bench.json --out merged/
#
# TensorRT there? The `check` stage prints it; by hand:
#   python3 -c "import tensorrt; print(tensorrt.__version__)"      # the Python package
#   ldconfig -p | grep -i nvinfer; find / -name 'libnvinfer*.so*' -not -path '*/proc/*' 2>/dev/null
#   command -v trtexec; python3 -m pip list 2>/dev/null | grep -i -E 'tensorrt|nvinfer'
# (the image's package list names no tensorrt; the `tensorrt` tests stay skipped without it).
# ---------------------------------------------------------------------------------------------
set -uo pipefail

stage=${1:-help}
cd "$(dirname "$0")/.." || exit 1          # the repo root, which is the dfosd package
OUT=${OUT:-/tmp/gpu-session-out}
WORK=${GPU_BENCH_WORK:-.gpu-bench}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/$stage.log"

setup() {
    if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then
        echo "no .whl/diffusers-*.whl: download the wheels HERE and pass carry [\".whl\"] (see the top of $0)"
        exit 3
    fi
    if [ ! -d /tmp/site/diffusers ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 4
    fi
    mkdir -p /tmp/dfosd-path && ln -sfn "$PWD" /tmp/dfosd-path/dfosd
    export PYTHONPATH=/tmp/dfosd-path:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONUNBUFFERED=1 DFOSD_SLOW=0
    python3 -c "import dfosd.core.onestep, diffusers, torch; print('dfosd from', dfosd.__file__, '| diffusers',
diffusers.__version__, '| torch', torch.__version__, torch.version.cuda)" || exit 5
}

bench() {  # bench SECONDS ARGS...: the GPU bench under a hard time limit, results copied to $OUT either way
    local limit=$1; shift
    timeout --signal=INT --kill-after=20 "$limit" python3 -m dfosd.bench.gpu_bench --work "$WORK" \
        --out "$WORK/results" --time-budget-s $((limit - 150)) "$@"
    local rc=$?
    cp -f "$WORK"/results/gpu_bench.json "$WORK"/results/gpu_bench.md "$WORK"/results/gpu_bench.png "$OUT"/ \
        2>/dev/null
    return $rc
}

run_stage() {
    case "$stage" in
    check)
        setup
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        python3 - <<'EOF'
import torch, importlib.util as u
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(),
      "sm", torch.cuda.get_device_capability(), "cudnn", torch.backends.cudnn.version())
from torch._inductor import aoti_load_package
import inspect; print("aoti_load_package", inspect.signature(aoti_load_package))
for m in ("tensorrt", "onnxruntime", "diffusers", "onnx_graphsurgeon", "triton"):
    print(f"{m:18} {'present' if u.find_spec(m) else 'absent'}")
import onnxruntime as ort; print("onnxruntime", ort.__version__, ort.get_available_providers())
EOF
        echo "--- TensorRT probe"
        python3 -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>&1 | tail -1
        ldconfig -p 2>/dev/null | grep -i nvinfer || echo "no libnvinfer in the linker cache"
        find / -xdev -name 'libnvinfer*.so*' 2>/dev/null | head -5
        command -v trtexec || echo "no trtexec on PATH"
        echo "--- pytest -m gpu (tiny model: cuda AOTI packages, one CUDA graph, parity)"
        timeout 420 python3 -m pytest -p no:cacheprovider -q -rs -m gpu tests/engines/test_aoti.py --durations=5
        ;;
    eager)   setup; bench 420 --rows eager --batches 1,4,8 ;;
    aoti1)   setup; bench 540 --rows aoti --batches 1 ;;
    aoti8)   setup; bench 560 --rows aoti,tiled --batches 8 ;;
    aoti4)   setup; bench 540 --rows aoti --batches 4 ;;
    compile) setup; bench 560 --rows compile --compile-batches 1 ;;
    ort)     setup; bench 540 --rows onnxruntime --batches 1,4,8 ;;
    smoke)   # CPU or GPU: the tiny model through every row, a few minutes on a CPU
        setup; python3 -m dfosd.bench.gpu_bench --base synthetic:tiny --tile 32 --batches 1 --work "$WORK/smoke" \
            --out "$OUT" --rows eager,aoti,onnxruntime,tiled --tiled-size 256 --warmup 1 --repeats 3 ;;
    *)
        sed -n '2,60p' "$0"; exit 0 ;;
    esac
}

run_stage 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
