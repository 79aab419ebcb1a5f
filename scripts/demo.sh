#!/usr/bin/env bash
# The main job on embedded defaults (no servers): install, build a demo catalog of real
# Fashion-MNIST product photos, ingest it, train the models on it (a short retrain: the
# first embedder is a random init), and query it with a held-out photo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SEARCHSVC_HOME=${SEARCHSVC_HOME:-$PWD/.searchsvc}
DEMO=${DEMO:-$PWD/demo}
.venv/bin/searchsvc demo-catalog "$DEMO" --products 300 --views 3
.venv/bin/searchsvc ingest "$DEMO/catalog"
echo "held-out photos, before training:"
.venv/bin/searchsvc eval --queries "$DEMO/queries"
.venv/bin/python -m trainer.retrain --max-minutes "${RETRAIN_MINUTES:-3}"
echo "held-out photos, after training:"
.venv/bin/searchsvc eval --queries "$DEMO/queries"
QUERIES=("$DEMO"/queries/*.jpg)  # a glob, not ls | head: head closing the pipe fails pipefail
QUERY=${QUERIES[0]}
echo "query photo: $QUERY (a new photo of product $(basename "$QUERY" | cut -d_ -f1))"
.venv/bin/searchsvc query "$QUERY" --top-k 5
.venv/bin/searchsvc status
