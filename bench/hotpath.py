#!/usr/bin/env python3
"""The hot-path benchmark of #12: every row of the issue's targets table, each figure
beside a baseline measured in the same run, with "ok" or "MISSED".

    .venv/bin/python bench/hotpath.py [--quick] [--only NAME ...] [--json PATH]

It runs each `bench/hot_<name>.py` module (`rows(quick, progress)`) in turn; each starts
and stops what it needs (daemons on temporary directories under /tmp, ledgers).
`--quick` is the smoke size (`tests/test_bench.py`); the full run is what the issue's
targets are judged by. The exit status is 0 even with MISSED rows: the table is the
report, not a gate.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.hotrows import Row, render  # noqa: E402 - sys.path is set first

#: The modules, in the order of the issue's table.
MODULES = ("sched", "api", "calls", "ledger", "retention", "sweep", "metrics")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument(
        "--only",
        nargs="+",
        choices=MODULES,
        metavar="NAME",
        help=f"run only these modules ({', '.join(MODULES)})",
    )
    p.add_argument("--json", metavar="PATH", help="also write every row as JSON here")
    a = p.parse_args(argv)
    # Jobs run as `nobody` under a root daemon: the admin's interpreter, not this venv.
    os.environ.setdefault("GPUD_JOB_PYTHON", "daemon")

    def progress(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    rows: list[Row] = []
    failed: list[str] = []
    for name in a.only or MODULES:
        progress(f"bench/hot_{name}.py")
        try:
            mod = importlib.import_module(f"bench.hot_{name}")
            rows += mod.rows(a.quick, progress)
        except Exception:  # noqa: BLE001 - one module's failure must not hide the others
            failed.append(name)
            traceback.print_exc()
    print(render(rows))
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {"quick": a.quick, "rows": [dataclasses.asdict(r) for r in rows], "failed": failed},
                indent=1,
            )
        )
    if failed:
        print(f"these modules failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
