#!/usr/bin/env bash
# What a GPU machine needs beside the checkout to run bench/gpu_check.py, in two git-ignored folders:
#   .whl/          captum and torchattacks wheels for Python 3.12 (a stock image with torch 2.11 lacks them)
#   .device-data/  the HAM10000 folder's JPEGs and HAM10000_metadata.csv (about 50 MB; no lesion masks)
# Then, on the GPU machine, from the checkout's root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   python3 bench/gpu_check.py --data .device-data/ham10000_200x150 --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data/ham10000_200x150}
rm -rf .whl .device-data
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d .whl captum==0.9.0 torchattacks==3.5.1
mkdir -p .device-data/ham10000_200x150
cp "$SRC/HAM10000_metadata.csv" .device-data/ham10000_200x150/
cp -r "$SRC"/HAM10000_images_part_* .device-data/ham10000_200x150/
du -sh .whl .device-data
echo "checkout + carried: $(( ($(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + $(du -sb .whl .device-data | awk '{s+=$1} END {print s}')) / 1048576 )) MiB (limit 64)"
