#!/usr/bin/env bash
# Download the wheels gpud needs on the GPU machine (Ubuntu 24.04, Python 3.12, x86_64,
# no registry access) into .whl/ (git-ignored), for scripts/gpu-check.sh to install there.
#
#   bash scripts/build-device-wheels.sh [EXTRA_PACKAGE ...]
#
# That machine already has torch, nvidia-ml-py, httpx, anyio, cloudpickle, click and rich;
# what it lacks is the daemon's stack: trio, hypercorn, msgspec, starlette and their
# dependencies (outcome, sniffio, sortedcontainers, attrs, idna, h11, h2, priority,
# wsproto, hpack, hyperframe, anyio, typing_extensions, ...). pip resolves the whole
# closure for CPython 3.12 on manylinux x86_64, one version of each, pinned to the
# versions in this checkout's .venv where it has them (the combination tested here).
# Carry the folder with the device tool (`carry: [".whl"]`); gpu-check.sh installs it
# with `pip install --no-index --no-deps --target .whl/site`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO/.whl"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
PACKAGES=(trio hypercorn msgspec starlette "$@")

mkdir -p "$DEST"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
# Pin to what this checkout's venv runs, where it has the package (plain name==version
# lines only: the editable gpud line and comments are not constraints).
if [ -x "$REPO/.venv/bin/python" ]; then
  "$REPO/.venv/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null \
    | grep -E '^[A-Za-z0-9_.-]+==[^ ]+$' > "$constraints" || true
fi

echo "[wheels] downloading ${PACKAGES[*]} and their dependencies into $DEST" >&2
"$PY" -m pip download --disable-pip-version-check --quiet \
  --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  -c "$constraints" -d "$DEST" "${PACKAGES[@]}"

# Two versions of one package would make the --no-deps install there fail: keep the
# newest when an earlier run left another.
"$PY" - "$DEST" <<'EOF'
import re, sys
from pathlib import Path

dest = Path(sys.argv[1])
by_name = {}
for whl in sorted(dest.glob("*.whl")):
    name = re.sub(r"[-_.]+", "_", whl.name.split("-")[0]).lower()
    by_name.setdefault(name, []).append(whl)
for name, files in by_name.items():
    if len(files) > 1:
        files.sort(key=lambda p: p.stat().st_mtime)
        for old in files[:-1]:
            print(f"[wheels] removing older {old.name}", file=sys.stderr)
            old.unlink()
EOF

# A stale install from an earlier set must not shadow the new wheels.
rm -rf "$DEST/site"
ls -1 "$DEST"/*.whl
du -sh "$DEST" | awk '{print "[wheels] " $1 " in .whl/"}' >&2
