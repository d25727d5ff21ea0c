#!/usr/bin/env python3
"""Fuzz gpud's HTTP API from its own /openapi.json with schemathesis (issue #10).

    .venv/bin/python bench/fuzz.py --minutes 5          # the full run
    .venv/bin/python bench/fuzz.py --seconds 30 --json out.json

It starts its own `gpud serve` (fake GPUs, a temporary data directory, loopback TCP with
a token made by `gpud admin` before the daemon's first start), loads the schema the daemon
serves, and sends schemathesis's cases for every operation, valid (positive) and invalid
(negative) by turns, until the time is up. Every answer must be below 500, and every
error a JSON ``{"error", "detail"}``. At the end the daemon must still be alive. It prints
the numbers (requests, by status, failures, the daemon's log size and tracebacks in it)
and exits 1 on any failure. tests/test_fuzz.py runs a bounded version in the normal suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from run import Daemon  # noqa: E402 - sys.path is set first

from gpud.testing.daemon_proc import gpud_admin  # noqa: E402 - sys.path is set first

#: Cases a failure report keeps (the first ones of each operation and status).
_KEEP = 20


@dataclass
class Report:
    seconds: float = 0.0
    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    #: seconds spent waiting for answers, per operation (where a slow run spends its time)
    wait_s: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    transport_errors: int = 0
    accepted: int = 0  # submits that got into the ledger (201)
    daemon_alive: bool = True
    log_bytes: int = 0
    log_tracebacks: int = 0

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.by_status.items() if s >= 500)

    @property
    def ok(self) -> bool:
        return not self.failures and self.daemon_alive and self.server_errors == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 1),
            "requests": self.requests,
            "requests_per_s": round(self.requests / max(self.seconds, 1e-9), 1),
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "server_errors": self.server_errors,
            "failures": len(self.failures),
            "failure_examples": self.failures[:_KEEP],
            "transport_errors": self.transport_errors,
            "accepted": self.accepted,
            "daemon_alive": self.daemon_alive,
            "log_bytes": self.log_bytes,
            "log_tracebacks": self.log_tracebacks,
            "by_operation": dict(sorted(self.by_operation.items())),
            "wait_s": {k: round(v, 2) for k, v in self.wait_s.most_common()},
            "ok": self.ok,
        }


def _problem(resp: Any) -> str | None:
    """Why an answer breaks the rule, or None: below 500, errors as JSON ErrorBody."""
    if resp.status_code >= 500:
        return f"status {resp.status_code}"
    if resp.status_code < 400:
        return None
    ctype = resp.headers.get("content-type") or ""
    ctype = ctype[0] if isinstance(ctype, list) else ctype  # schemathesis: lists of values
    if not ctype.startswith("application/json"):
        return f"a {resp.status_code} that is not JSON ({ctype!r})"
    try:
        body = json.loads(resp.content)
    except ValueError:
        return f"a {resp.status_code} whose body is not valid JSON"
    if not (
        isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and isinstance(body.get("detail"), str)
        and body["detail"]
    ):
        return f"a {resp.status_code} without error and detail"
    return None


def _tame(case: Any) -> None:
    """Keep a case from waiting on purpose: the long poll and a followed log stream last
    as long as a job does; fuzzing them at full length would spend the run waiting."""
    if case.path.endswith("/wait"):
        if not isinstance(case.query, dict):
            case.query = {}
        # Absent, the daemon waits its default 30 s; a value it refuses stays as it is.
        case.query.setdefault("timeout", 0.2)
        with contextlib.suppress(TypeError, ValueError):
            case.query["timeout"] = min(float(case.query["timeout"]), 0.2)
    if case.path.endswith(("/jobs/run", "/stream", "/results")):
        # These follow a job or a batch to its end: bound them as the long poll above.
        if not isinstance(case.query, dict):
            case.query = {}
        case.query.setdefault("timeout", 0.2)
        with contextlib.suppress(TypeError, ValueError):
            case.query["timeout"] = min(float(case.query["timeout"]), 0.2)
    if case.path.endswith("/logs") and isinstance(case.query, dict) and "follow" in case.query:
        case.query["follow"] = "false"


def fuzz(
    base_url: str,
    token: str,
    seconds: float,
    *,
    examples: int = 30,
    report: Report | None = None,
    progress: Any = None,
) -> Report:
    """Send schemathesis cases to the daemon at ``base_url`` for ``seconds``."""
    import httpx
    import hypothesis
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import strategies as st

    report = report or Report()
    doc = httpx.get(base_url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(doc)
    ops = [r.ok() for r in schema.get_all_operations()]
    session = requests.Session()
    headers = {"authorization": f"Bearer {token}"}
    modes = list(schemathesis.GenerationMode)
    deadline = time.monotonic() + seconds
    start = time.monotonic()

    def check(case: Any) -> None:
        if time.monotonic() > deadline:
            return
        _tame(case)
        label = f"{case.method} {case.path}"
        t0 = time.monotonic()
        try:
            resp = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        except requests.RequestException as e:
            report.transport_errors += 1
            report.failures.append({"operation": label, "problem": f"no answer: {e}"})
            return
        report.wait_s[label] += time.monotonic() - t0
        report.requests += 1
        report.by_status[resp.status_code] += 1
        report.by_operation[label] += 1
        if resp.status_code == 201:
            report.accepted += 1
        why = _problem(resp)
        if why is not None:
            report.failures.append(
                {
                    "operation": label,
                    "problem": why,
                    "body": resp.text[:500],
                    "curl": case.as_curl_command(headers=headers)[:2000],
                }
            )

    cfg = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        phases=[Phase.explicit, Phase.generate],
        print_blob=False,
    )
    # A random `python` never matches the daemon's workers, so valid submits would never
    # get past that check into the ledger: in positive mode half of them carry the right one.
    worker_python = httpx.get(base_url + "/v1/health", timeout=10).json()["worker_python"]

    def with_python(case: Any, coin: bool) -> Any:
        body = case.body
        if coin and isinstance(body, dict) and "python" in body:
            body["python"] = worker_python
            # JSON Schema counts 6.0 as an integer and the generator sends it so; msgspec
            # (like Python) does not, and a real client sends 6.
            for k in ("retries", "priority", "memory"):
                if isinstance(body.get(k), float) and body[k].is_integer():
                    body[k] = int(body[k])
        return case

    tests = []
    for op in ops:
        for mode in modes:
            strategy = op.as_strategy(generation_mode=mode)
            if mode is schemathesis.GenerationMode.POSITIVE and op.method.upper() == "POST":
                strategy = st.builds(with_python, strategy, st.booleans())
            tests.append((op.label, mode, cfg(given(case=strategy)(check))))
    unsatisfiable: set[tuple[str, Any]] = set()
    rounds = 0
    with warnings.catch_warnings():
        # schemathesis and Hypothesis say things about generation (e.g. a strategy that
        # filters much); they are about the fuzzer, not the daemon.
        warnings.simplefilter("ignore")
        while time.monotonic() < deadline:
            for label, mode, test in tests:
                if time.monotonic() > deadline:
                    break
                if (label, mode) in unsatisfiable:
                    continue
                try:
                    test()
                except hypothesis.errors.Unsatisfiable:
                    # Nothing to get wrong (GET /v1/health takes no input at all).
                    unsatisfiable.add((label, mode))
            rounds += 1
            if progress:
                progress(
                    f"round {rounds}: {report.requests} requests, "
                    f"{report.server_errors} >= 500, {len(report.failures)} failures"
                )
    session.close()
    report.seconds += time.monotonic() - start
    return report


def _fuzz_user(data_dir: Path) -> tuple[str, str]:
    """A gpud user for the fuzzer, made before the daemon's first start. As root the
    daemon runs jobs as their submitter, so it is a real account (nobody)."""
    name = "nobody" if os.geteuid() == 0 else "fuzzer"
    token = gpud_admin(data_dir, "user", "add", name, "--no-token-file", cwd=REPO)
    # Submits that get through run (and fail: their function is random bytes); a quota
    # keeps the queue from growing without end, and its refusal is one more path covered.
    gpud_admin(data_dir, "quota", "set", name, "--queued", "20", cwd=REPO)
    return name, token


def run(seconds: float, *, examples: int = 30, progress: Any = None) -> Report:
    base = Path(tempfile.mkdtemp(prefix="gpud-fuzz-", dir="/tmp"))
    os.chmod(base, 0o755)
    d = Daemon(
        base,
        "fuzz",
        cpu_slots=2,
        tcp=True,
        env={
            # Jobs that get through are garbage and fail at once; keep them short anyway.
            "GPUD_MAX_TIMEOUT": "30",
            "GPUD_RETRY_BACKOFF": "0.1",
        },
    )
    report = Report()
    try:
        _, token = _fuzz_user(d.data_dir)
        d.start()
        fuzz(d.tcp_url, token, seconds, examples=examples, report=report, progress=progress)
        report.daemon_alive = d.alive()
        log = d.log.read_bytes()
        report.log_bytes = len(log)
        report.log_tracebacks = log.count(b"Traceback (most recent call last)")
        if not report.daemon_alive:
            report.failures.append(
                {
                    "operation": "-",
                    "problem": "the daemon exited",
                    "body": log[-3000:].decode(errors="replace"),
                }
            )
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, help="how long to fuzz (default 5 minutes)")
    ap.add_argument("--seconds", type=float, help="how long to fuzz, in seconds")
    ap.add_argument(
        "--examples",
        type=int,
        default=30,
        help="cases per operation and mode before moving on (default 30)",
    )
    ap.add_argument("--json", type=Path, help="also write the report here as JSON")
    args = ap.parse_args()
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 5.0)
    report = run(
        seconds, examples=args.examples, progress=lambda m: print(m, file=sys.stderr, flush=True)
    )
    out = report.as_dict()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(
        f"fuzzed {out['seconds']} s: {out['requests']} requests "
        f"({out['requests_per_s']}/s), by status {out['by_status']}"
    )
    print(
        f"responses >= 500: {out['server_errors']}, failures: {out['failures']}, "
        f"transport errors: {out['transport_errors']}, daemon alive: {out['daemon_alive']}"
    )
    print(f"daemon log: {out['log_bytes']} bytes, {out['log_tracebacks']} tracebacks")
    for f in report.failures[:_KEEP]:
        print(
            f"FAIL {f['operation']}: {f['problem']}\n  {f.get('body', '')[:300]}\n"
            f"  {f.get('curl', '')[:500]}"
        )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
