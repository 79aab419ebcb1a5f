#!/usr/bin/env bash
# The quality benchmarks on a GPU, 10x the training of the CPU runs (issue 19), for a
# session that is lent one. NOT RUN YET: the session that wrote it had no GPU (device
# status: not drawn). Minutes, not hours: on an H100/H200 the small profile's steps take
# milliseconds, so ten times the CPU runs' step counts fit the device's 15 minutes.
#
# The CPU runs it is compared with (benchmarks/results/README.md lists them):
#   bench_quality_real.py     --embedder-steps 400 --stir-steps 300 (small and small64)
#   bench_quality_instance.py --embedder-steps 600 --stir-steps 500 (the reduced run)
# Paste each GPU table beside its CPU table. The reports go where the results index
# expects them: <benchmark>/<date>-<gpu>-<topic>.{json,md}.
#
# ViT-S/16 at 224 (profile vit_s16) starts from timm's DINO weights, which the device
# machine cannot download (it reaches nothing outside): its run is tried and skipped
# when the weights are not in the local timm/Hugging Face cache.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export PYTHONPATH=$PWD
PY=${PY:-python}
out=${OUT:-benchmarks/results}
day=$(date -u +%F)
gpu=gpu
status=0
run() { echo "+ $*" >&2; "$@" || { echo "FAILED: $*" >&2; status=1; }; }

run "$PY" benchmarks/bench_quality_real.py --embedder-steps 4000 --stir-steps 3000 \
    --profile small --no-progress --out "$out/quality_real/$day-$gpu-small-10x"
run "$PY" benchmarks/bench_quality_real.py --embedder-steps 4000 --stir-steps 3000 \
    --profile small64 --no-progress --out "$out/quality_real/$day-$gpu-small64-10x"
run "$PY" benchmarks/bench_quality_instance.py --embedder-steps 6000 --stir-steps 5000 \
    --train-products 20000 --test-products 2000 --val-products 500 --photos 5 \
    --no-progress --out "$out/quality_instance/$day-$gpu-small-10x"
# ViT-S/16 at 224: real photos only (the instance photos are 28 px articles), a short run.
run "$PY" benchmarks/bench_quality_real.py --embedder-steps 600 --stir-steps 400 \
    --profile vit_s16 --no-progress --out "$out/quality_real/$day-$gpu-vit-s16"
exit $status
