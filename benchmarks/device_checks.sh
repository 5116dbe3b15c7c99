#!/usr/bin/env bash
# The accelerator checks of the throughput issues in one run, sized for one 10-minute command on
# a single-GPU machine that has PyTorch, torchvision, pyarrow and OpenCV but no Ray, MLflow or
# PyAV (see docs/performance.md for what each figure means):
#
#   flow    TV-L1 in PyTorch at 340x256 on the GPU, compiled and eager (goal: 300 frame
#           pairs/s on one H100)
#   ingest  --decode device: Parquet read + plan per CPU core, and the batched nvJPEG decode +
#           crop/resize/flip rate on the GPU, next to the CPU decode path
#   contact the training path's GPU-only properties (benchmarks/gpu_contact.py): channels-last
#           layout, the loop's reduction on NCCL, no host syncs inside an epoch, side-stream
#           JPEG decode under allocator churn
#   step    the fused R50 + R152 training step at 224, bf16, channels_last, eager and compiled:
#           chunks/s and MFU (goal: 40%), and the same step fed JPEG clips decoded in the loop
#
#   bash benchmarks/device_checks.sh            # writes one log per check to $OUT (or ./device-out)
#
# Each check has its own time limit, so a slow one cannot starve the others; the limits add up
# to 570 s. Every warning is shown (PYTHONWARNINGS=default: each once per place), and the first
# lines give the torch, torchvision and CUDA versions: the lent machine has had torch 2.11 /
# torchvision 0.26, older than the project's pins, and the scripts must run on both.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PYTHONWARNINGS=default
PY=${PYTHON:-python3}

check() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
    $PY -c "import sys, torch, torchvision, cv2, numpy, pyarrow; print('python', \
sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', \
torch.cuda.is_available() and torch.cuda.get_device_name(), 'opencv', cv2.__version__, \
'numpy', numpy.__version__, 'pyarrow', pyarrow.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

check contact 40 $PY benchmarks/gpu_contact.py
FLOW=(benchmarks/flow_throughput.py --no-ray --algorithms tvl1-torch --width 340 --height 256
    --videos 8 --frames 65 --workers 1)
check flow-compiled 140 $PY "${FLOW[@]}" --compile on
check flow-eager 60 $PY "${FLOW[@]}" --compile off
check ingest 60 $PY benchmarks/ingest_throughput.py --modes stages,gpu --epochs 3
# eager first, then compiled: a slow compile still leaves the eager figures in the log
check step 270 $PY benchmarks/train_step.py --preset paper --compile both --steps 16 --warmup 8 \
    --accum 4 --decode-jpeg
