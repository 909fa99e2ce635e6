#!/usr/bin/env bash
# Wheels for benchmarks/gpu_run.sh on a GPU machine that cannot reach PyPI (this workplace's lent
# H200: its image has python3 3.12 with a CUDA torch, OpenCV, numpy, pyarrow, pandas, psutil, but
# no Ray, pydantic or soundfile). Run here, from the repository root, where PyPI is reachable:
#
#   benchmarks/gpu_wheels.sh            # -> .whl/ (about 48 MB), ignored by git
#
# then name .whl in the device call's `carry`; gpu_run.sh installs them with --target.
# PY_VERSION (default 3.12) must match the GPU machine's python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
DEST=.whl
PIP=${PIP:-python3 -m pip}

# What the preprocess path imports beyond the image's packages, at the versions the tests run with
# (Ray's own needs -- click, msgpack, protobuf, requests, aiohttp's family -- are in the image).
WHEELS=(
  ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
)

rm -rf "$DEST" && mkdir -p "$DEST"
$PIP download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"

# Ray's wheel (79 MB) carries its Java worker (ray/jars, 31 MB) and the dashboard's JavaScript source
# map: a Python job uses neither, and without them the carried tree stays under the device tool's
# 64 MiB. The wheel is rewritten without those files (and their RECORD lines).
python3 - "$DEST" <<'EOF'
import sys, zipfile
from pathlib import Path

for whl in Path(sys.argv[1]).glob("ray-*.whl"):
    def dropped(name: str) -> bool:
        return name.startswith("ray/jars/") or name.endswith(".js.map")
    tmp = whl.with_suffix(".tmp")
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not dropped(line.split(b",", 1)[0].decode()))
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(whl)
    print(f"{whl.name}: {whl.stat().st_size / 2**20:.1f} MiB after dropping ray/jars and *.js.map")
EOF

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
du -sh "$DEST"
ls "$DEST"
