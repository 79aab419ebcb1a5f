#!/usr/bin/env bash
# The main job on embedded defaults (no servers): install, build a demo catalog of real
# Fashion-MNIST product photos, ingest it, train the models on it (a short retrain), and
# look at how well held-out photos are answered: three tables, then sampled queries and
# an HTML report ($DEMO/report/index.html) with their pictures.
set -euo pipefail
cd "$(dirname "$0")/.."
# VENV: an environment that already has searchsvc installed (then setup.sh is skipped).
if [ -z "${VENV:-}" ]; then
    bash scripts/setup.sh
    VENV=.venv
fi
export SEARCHSVC_HOME=${SEARCHSVC_HOME:-$PWD/.searchsvc}
DEMO=${DEMO:-$PWD/demo}
# The first embedder: the configured profile's start checkpoint, trained on Fashion-MNIST's
# TRAIN split by a committed recipe (models/start/README.md); the demo's products come
# from the TEST split, so it has seen none of them. START_WEIGHTS= (empty) starts from a
# seeded random init instead. Used only when $SEARCHSVC_HOME has no embedder yet. The
# profile is read from the settings (environment or TOML file), as every command reads it.
PROFILE=$("$VENV"/bin/python -c \
    'from searchsvc.core.config import load_settings; print(load_settings().embedder_profile)')
START_WEIGHTS=${START_WEIGHTS-$PWD/models/start/$PROFILE-fmnist.safetensors}
if [ -n "$START_WEIGHTS" ] && [ -f "$START_WEIGHTS" ]; then
    export SEARCHSVC_EMBEDDER_WEIGHTS=$START_WEIGHTS
elif [ -n "$START_WEIGHTS" ]; then
    echo "no start checkpoint at $START_WEIGHTS (make it: see models/start/README.md);" \
        "starting from a seeded random init" >&2
fi
section() { printf '\n== %s\n' "$1"; }
# Each step says how long it took, so a newcomer knows what to expect next time.
timed() {
    local start=$SECONDS
    "$@"
    echo "(took $((SECONDS - start)) s)"
}

timed "$VENV"/bin/searchsvc demo-catalog "$DEMO" --products 300 --views 3
timed "$VENV"/bin/searchsvc ingest "$DEMO/catalog"

section "Before training. Held-out photos (a new photo of each of the 300 products, never ingested) against the live index, answered by the query path as a shopper's photo is:"
timed "$VENV"/bin/searchsvc eval --queries "$DEMO/queries"

section "Retrain (${RETRAIN_MINUTES:-3} minutes): the embedder, then STIR, on the catalog's training side; the promotion gate compares each with the serving model on the validation side"
timed "$VENV"/bin/python -m trainer.retrain --max-minutes "${RETRAIN_MINUTES:-3}"

section "After training. 1) Validation split: the products the retrain held out (about 20%); each of their catalog photos queries the others. This is what the gate measured:"
timed "$VENV"/bin/searchsvc eval
section "2) Held-out photos of all 300 products against the live index (the retrain trained on the other photos of about 80% of these products):"
timed "$VENV"/bin/searchsvc eval --queries "$DEMO/queries"
section "3) Held-out photos of the validation products only: products no training has seen. With pictures:"
timed "$VENV"/bin/searchsvc eval --queries "$DEMO/queries" --split val --report "$DEMO/report"
section "Status"
timed "$VENV"/bin/searchsvc status
