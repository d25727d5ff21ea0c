# Sourced by scripts/serve and scripts/test: make .venv and install gpud into it, once.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GPUD_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3}"
ensure_venv() {  # $1: the extras to install, e.g. "" or "[test]"
  local extras="$1"
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "gpud needs Python >= 3.11; $PY is $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[gpud] creating $VENV" >&2
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
      echo "[gpud] python3 -m venv failed; installing python3-venv" >&2
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        "$PY" -m venv "$VENV"
      else
        echo "install your distribution's python3-venv package and retry" >&2; exit 1
      fi
    fi
  fi
  local stamp="$VENV/.gpud-installed$extras"
  local want
  want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[gpud] installing gpud$extras into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO$extras" \
      2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$VENV/bin/python" -c "import gpud, gpud_client" || { echo "install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
  fi
}
