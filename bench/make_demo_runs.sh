#!/usr/bin/env bash
# Regenerate the demo runs in checkpoints/ from scratch: train the six methods (and the gaussian base classifier of
# randomized smoothing) on the HAM10000
# sample (64 px, resnet8, l2 eps 0.3, K=7, seed 0, 10 epochs), evaluate them, and copy them in
# with robustness curves, the paper's protocol and attribution numbers.
# About 1.5 h on a 2-core CPU (two workers); run from anywhere, with ../shared beside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
store=${STORE:-study_runs}
workers=${WORKERS:-2}
pids=()
for _ in $(seq "$workers"); do
  python bench/study.py run main64 smooth64 --seeds 0 --queue --threads 1 --store "$store" & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
python bench/demo_runs.py --store "$store"
python -m dpaat_core runs --store checkpoints
