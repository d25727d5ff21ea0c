"""The release (#16): the version comes from the build (setuptools-scm, from git tags) and
`gpud --version` / `gpud version` show it; CI builds every artefact and smoke-tests each.

The artefacts themselves are built and installed into fresh venvs by `scripts/release`
and `scripts/smoke-release`, which `.ci/run` runs after the suite (minutes, network)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
from pathlib import Path

import gpud
from tests.conftest import gpud_cli

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_is_the_installed_distributions() -> None:
    assert gpud.__version__ == importlib.metadata.version("gpud")
    # PEP 440, from a tag (0.2.0) or N commits after one (0.2.1.devN+gHASH[.dDATE])
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+)?(\+[0-9a-z.]+)?", gpud.__version__)


def test_cli_shows_the_version() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GPUD_URL"}
    env["GPUD_URL"] = "unix:///nonexistent/gpud.sock"  # no daemon: the client's alone
    out = gpud_cli("--version", env=env)
    assert out.returncode == 0 and gpud.__version__ in out.stdout
    out = gpud_cli("version", "--json", env=env)
    assert out.returncode == 0
    assert json.loads(out.stdout)["client"] == gpud.__version__


def test_ci_builds_and_smoke_tests_every_artefact() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/release" in ci and "scripts/smoke-release" in ci
    smoke = (ROOT / "scripts" / "smoke-release").read_text()
    for kind in ("wheel", "sdist", "pyz"):
        assert f"{kind})" in smoke
    for script in ("release", "smoke-release"):
        path = ROOT / "scripts" / script
        assert os.access(path, os.X_OK), f"scripts/{script} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
