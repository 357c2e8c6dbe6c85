#!/usr/bin/env bash
# Every GPU check of the Wan pipeline in one run, for a lent GPU machine (see docs/streaming.md):
# the parity tests on CUDA-capable code paths, benchmarks/wan_streaming.py at 832x480 in bf16, eager and
# compiled (and 2 streams in turn, compiled), the peak memory of every row of benchmarks/memory.py measured with torch.cuda.max_memory_allocated
# beside its FakeTensorMode figure (and the 1-GPU Self Forcing + DMD training step's), then one Self Forcing + DMD and one Teacher Forcing + DMD training step
# cycle of the 1.3B recipes (benchmarks/training_step.py --wan 1.3b). Results go to $OUT (or
# benchmarks/results). About 6 minutes on an H200 for the streaming part; the training part writes a
# random 1.3B folder first.
#
# DRY=1 runs every step on the CPU at a tiny size instead (the same scripts; a few minutes on 2 cores):
# what a session without a GPU runs to show the script works end to end.
#
# The machine has torch, transformers, accelerate, tokenizers and sentencepiece but not diffusers,
# omegaconf, ftfy or imageio-ffmpeg: carry them as wheels in .whl/ (pip download --no-deps ... -d .whl).
set -euo pipefail
OUT=${OUT:-benchmarks/results}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:src
else
    export PYTHONPATH=src
fi
export PYTHONUNBUFFERED=1
if [ "${DRY:-0}" = 1 ]; then  # the CPU, tiny models: every script end to end
    W="--size tiny --device cpu --dtype fp32 --repeats 1"; C=""; M="--check"; T="--wan tiny --device cpu"
    echo "dry run on the CPU" | tee "$OUT/gpu.txt"
else
    W="--size 1.3b --device cuda --dtype bf16 --repeats 2"; C="--compile"; M="--device cuda"; T="--wan 1.3b --device cuda"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
S=$([ "${DRY:-0}" = 1 ] && echo tiny_cpu || echo 1.3b_cuda)
python3 -m pytest -q -p no:cacheprovider tests/test_wan_*.py 2>&1 | tail -3
python3 benchmarks/wan_streaming.py $W --out "$OUT/wan_streaming_$S.json"
python3 benchmarks/wan_streaming.py $W $C --out "$OUT/wan_streaming_${S}_compile.json"
python3 benchmarks/wan_streaming.py $W $C --overlap-decode --lengths 1 --out "$OUT/wan_streaming_${S}_compile_overlap.json"
python3 benchmarks/wan_streaming.py $W $C --decoder tae --out "$OUT/wan_streaming_${S}_tae_compile.json"
python3 benchmarks/wan_streaming.py $W $C --streams 2 --lengths 1 --out "$OUT/wan_streaming_${S}_compile_2streams.json"
python3 benchmarks/memory.py $M --out "$OUT/memory_$S.json"
python3 benchmarks/memory.py --training $M --out "$OUT/memory_training_$S.json"
python3 benchmarks/training_step.py $T --cycles 1 --out "$OUT/training_step_wan_$S.json"
python3 benchmarks/training_step.py $T --cycles 1 --recipes wan/sf_dmd_1.3b_1gpu_80gb.yaml wan/sf_dmd_1.3b_1gpu_48gb.yaml \
    --out "$OUT/training_step_wan_1gpu_$S.json"
