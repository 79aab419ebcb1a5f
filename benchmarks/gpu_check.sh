#!/usr/bin/env bash
# The GPU checks of the STIR issue, in one short run (about 2 minutes on an H100):
# ViT-S/16 448x224 pairs/s in bf16 and the p50 of a top-5 rerank.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python benchmarks/bench_stir.py --profiles vit_s16 --batches 5 64 256 --iters-vit 50 --device cuda
python benchmarks/bench_rerank_p50.py --profile vit_s16 --device cuda --precision bf16 --iters 200
python benchmarks/bench_rerank_p50.py --profile vit_s16 --device cuda --precision fp32 --iters 100
