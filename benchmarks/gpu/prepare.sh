#!/usr/bin/env bash
# Builds, on this (GPU-less) machine, what benchmarks/gpu/run.sh needs on the GPU machine, into
# benchmarks/gpu/carry/ (git-ignored; the device tool's `carry` takes it along):
#   sdmesh-bench.xz   release build with --features flash-attn (CUDA and the flash-attention
#                     kernels), stripped and compressed (the tree that travels is limited to
#                     64 MiB, the committed fixtures take ~45)
#   site.tar.xz       diffusers (pure Python; the GPU image has torch and transformers),
#                     installed here and packed: 1.9 MB against the wheels' 6.4
# usage: benchmarks/gpu/prepare.sh   (CUDA_SETUP: the CUDA 13 toolchain script, default
#        ../shared/cuda/setup-cuda13.sh; see README "GPU")
set -euo pipefail
cd "$(dirname "$0")/../.."
setup=${CUDA_SETUP:-../shared/cuda/setup-cuda13.sh}
# shellcheck disable=SC1090
source "$setup"
shared/flash-attn/fetch-sources.sh
CARGO_TARGET_DIR=target/cuda cargo build --release --features flash-attn -p sdmesh --bin sdmesh-bench
carry=benchmarks/gpu/carry
rm -rf "$carry" && mkdir -p "$carry"
strip -o "$carry/sdmesh-bench" target/cuda/release/sdmesh-bench
xz -T0 -9 -f "$carry/sdmesh-bench"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$work/wheels" diffusers==0.42.1 importlib_metadata
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$work"/wheels/*.whl
tar -C "$work/site" -cf - . | xz -T0 -9 > "$carry/site.tar.xz"
du -sh "$carry"/*
# What the device tool will send: tracked and untracked-not-ignored files plus the carry.
echo "travelling: $(( ($( (git ls-files -co --exclude-standard -z; find "$carry" -type f -print0) | du -cb --files0-from=- | tail -1 | cut -f1) + 1048575) / 1048576 )) MiB of 64"
