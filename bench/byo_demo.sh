#!/usr/bin/env bash
# "Your own classifier" on real data: a MobileNetV3-Small trained outside DPAAT Lab (bench/outside_model.py, plain
# torchvision) is imported, audited, hardened with DPAAT from its own weights, and the hardened run audited; both
# are measured under natural corruptions, then one report compares the two. About 18 min on a 2-core CPU; run from anywhere, with ../shared beside the repo.
# STORE (default study_runs/byo) holds the runs; bench/byo_ship.py copies them into checkpoints/ as demo runs.
set -euo pipefail
cd "$(dirname "$0")/.."
store=${STORE:-study_runs/byo}
data=npz:../shared/data/ham10000_sample.npz
weights=study_runs/outside/mobilenet_v3_small_ham64.pt
[ -f "$weights" ] || python bench/outside_model.py --out "$weights"
imported=$store/demo-imported-mobilenet_v3_small-ham10000
hardened=$store/demo-hardened-mobilenet_v3_small-ham10000
[ -d "$imported" ] || python -m dpaat_core import --arch mobilenet_v3_small --weights "$weights" --image-size 64 \
  --data "$data" --store "$store" --name "$(basename "$imported")"
[ -f "$imported/report.html" ] || python -m dpaat_core audit "$imported" --device cpu
[ -f "$hardened/weights.safetensors" ] || python -m dpaat_core train --init-from "$imported" --method dpaat \
  --epochs 12 --patience 12 --early-stop balanced_accuracy --store "$store" --name "$(basename "$hardened")" \
  --device cpu --quiet
python -m dpaat_core audit "$hardened" --device cpu
for run in "$imported" "$hardened"; do
  python -m dpaat_core evaluate "$run" --corruptions all --device cpu
done
python -m dpaat_core report "$imported" "$hardened" -o "$store/byo-report.html" --device cpu
