#!/usr/bin/env bash
# Issue 6's GPU check, for a session that is lent one (this script has NOT run yet: the
# session that wrote it had no GPU). Both quality benchmarks on the GPU with the same
# data as the committed CPU runs; on an H100 the small ViT trains far more than 10x the
# steps a CPU core gives in the CPU runs' minutes, so the budgets here are short enough
# for the device's 15 minutes in all. Compare the step counts in the reports with the CPU
# reports (benchmarks/results/README.md lists them) and paste both tables side by side.
# The reports go where the results index expects them: <benchmark>/<date>-gpu.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
out=${OUT:-benchmarks/results}
day=$(date -u +%F)
python benchmarks/bench_quality_instance.py --embedder-minutes 2 --stir-minutes 2 \
    --train-products 20000 --test-products 2000 --val-products 500 --photos 5 \
    --precision auto --no-progress --out "$out/quality_instance/$day-gpu"
python benchmarks/bench_quality_class.py --embedder-minutes 2.5 --stir-minutes 1.5 \
    --queries 10000 --val-size 2000 --precision auto --no-progress \
    --out "$out/quality_class/$day-gpu"
