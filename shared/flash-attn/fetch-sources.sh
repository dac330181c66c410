#!/usr/bin/env bash
# Fetches the sources the flash-attention kernels are built from, from the package registries,
# pinned by version and sha256:
#   candle-flash-attn 0.11.1 (crates.io): Tri Dao's flash-attention 2 forward kernels, BSD-3-Clause
#   nvidia-cutlass 3.5.0.0 (PyPI): the CUTLASS/CuTe headers those kernels are written in (the
#     crate's own build clones CUTLASS 3.5.0 from GitHub, which cannot be reached here)
# usage: shared/flash-attn/fetch-sources.sh [DEST]   (default target/flash-attn-sources; the
#        build reads SDMESH_FLASH_ATTN_SOURCES, with the same default)
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-target/flash-attn-sources}
crate_sha=e8f233a5d78ac84fac2b097330faae4a26eae4c4009c54fdb0ec8b7b3c23a15b
wheel_sha=4ec3ab4820dd4ae3ebc2c5ddf23352b0dc90f779435284e7dce822006adc51f6
if [ -f "$dest/.complete" ]; then echo "flash-attention sources already in $dest"; exit 0; fi
rm -rf "$dest" && mkdir -p "$dest/download"
crate="$dest/download/candle-flash-attn-0.11.1.crate"
curl -sSfL -o "$crate" https://static.crates.io/crates/candle-flash-attn/candle-flash-attn-0.11.1.crate
echo "$crate_sha  $crate" | sha256sum -c --quiet
python3 -m pip download -q --no-deps --only-binary=:all: -d "$dest/download" nvidia-cutlass==3.5.0.0
wheel="$dest/download/nvidia_cutlass-3.5.0.0-py3-none-any.whl"
echo "$wheel_sha  $wheel" | sha256sum -c --quiet
tar xzf "$crate" -C "$dest"
mv "$dest/candle-flash-attn-0.11.1/kernels" "$dest/kernels"
cp "$dest/candle-flash-attn-0.11.1/Cargo.toml" "$dest/kernels/CRATE-Cargo.toml"
rm -rf "$dest/candle-flash-attn-0.11.1"
python3 - "$wheel" "$dest/cutlass" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
prefix = "cutlass_library/source/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        rest = name[len(prefix):] if name.startswith(prefix) else None
        if rest and (rest.startswith("include/") or rest.startswith("tools/util/include/") or rest == "LICENSE.txt"):
            target = f"{out}/{rest}"
            import os; os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as dst: dst.write(src.read())
PY
rm -rf "$dest/download"
touch "$dest/.complete"
echo "flash-attention sources in $dest"
