#!/usr/bin/env python3
"""Attack a real `gpud serve` the way issue #10 found it could be crashed, and check it lives.

    .venv/bin/python bench/attack.py [--rounds 200] [--json out.json]

The attack: ``POST /v1/jobs`` headers announcing ``Content-Length: 1000000`` and the
connection closed at once, N times over the Unix socket and N times over TCP with no
token. Before the fix the daemon exited with status 1 in about a quarter of the tries.
The script starts its own daemon (fake GPUs, the process executor, a temporary data
directory under /tmp), runs the rounds, checks that the daemon still answers
``/v1/health`` after every round, and compares the daemon's RSS (from /proc) after the
attack with its RSS before. It exits 1 when the daemon died, stopped answering, or grew
by more than ``--max-rss-growth-mb`` (20 MB, the issue's acceptance).

``tests/test_http_edge.py`` runs the same code with fewer rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gpud.testing.daemon_proc import DaemonProc  # noqa: E402 - sys.path is set first

#: What a test daemon needs: fake GPUs, short timers, info logging.
DAEMON_ENV = {
    "GPUD_GPUS": "fake",
    "GPUD_FAKE_GPUS": "h100,h100",
    "GPUD_CPU_SLOTS": "2",
    "GPUD_KILL_GRACE": "1",
    "GPUD_LOG_LEVEL": "info",
}

HEADERS = (
    b"POST /v1/jobs HTTP/1.1\r\nHost: gpud\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000000\r\n\r\n"
)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Daemon(DaemonProc):
    """A `gpud serve` subprocess (gpud.testing.daemon_proc) on a Unix socket and a loopback
    TCP port."""

    def __init__(self, base: Path, extra_env: dict[str, str] | None = None) -> None:
        super().__init__(base, env=dict(extra_env or {}), settings=DAEMON_ENV, tcp=True)

    def connect(self, over: str, timeout: float = 5.0) -> socket.socket:
        if over == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(str(self.socket))
        else:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return s

    def health(self, over: str = "unix", timeout: float = 5.0) -> int:
        """The status code of GET /v1/health (raises OSError when nothing answers)."""
        with self.connect(over, timeout) as s:
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: gpud\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        parts = data.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@contextlib.contextmanager
def daemon(extra_env: dict[str, str] | None = None) -> Iterator[Daemon]:
    base = Path(tempfile.mkdtemp(prefix="gpud-attack-", dir="/tmp"))
    os.chmod(base, 0o755)
    d = Daemon(base, dict(extra_env or {}))
    try:
        d.start()
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def attack_once(d: Daemon, over: str) -> None:
    """Headers promising a 1 MB body, then close at once (the crash of #10 item 1)."""
    try:
        s = d.connect(over)
    except OSError:
        return  # the daemon may be busy closing the last one; the health check judges
    with s, contextlib.suppress(OSError):
        s.sendall(HEADERS)


@dataclass
class Report:
    rounds: int
    tries: int = 0
    died_after: int | None = None
    exit_code: int | None = None
    unanswered: int = 0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    seconds: float = 0.0
    log_tail: str = ""

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_after_mb - self.rss_before_mb


def complete_post(d: Daemon, over: str) -> None:
    """A whole (invalid) submit: 400/401/422, through the same body-reading code."""
    body = b'{"not": "a job"}'
    with d.connect(over) as s:
        s.sendall(HEADERS.replace(b"1000000", str(len(body)).encode()) + body)
        with contextlib.suppress(OSError):
            s.recv(4096)


def warm_up(d: Daemon, n: int = 10) -> None:
    """A few well-formed requests first, so the RSS baseline includes what any served
    request allocates once (imports, caches), not only the idle daemon."""
    for i in range(n):
        over = "unix" if i % 2 else "tcp"
        d.health(over)
        complete_post(d, over)


def run(d: Daemon, rounds: int) -> Report:
    assert d.proc is not None
    warm_up(d)
    time.sleep(0.3)
    rep = Report(rounds=rounds, rss_before_mb=rss_bytes(d.proc.pid) / 2**20)
    t0 = time.monotonic()
    for i in range(rounds):
        for over in ("unix", "tcp"):
            attack_once(d, over)
            rep.tries += 1
        if not d.alive():
            rep.died_after = rep.tries
            break
        # Probe now and then (every round would mostly test the probe), and at the end.
        if i % 10 == 9 or i == rounds - 1:
            try:
                if d.health("unix" if i % 20 == 9 else "tcp") != 200:
                    rep.unanswered += 1
            except OSError:
                rep.unanswered += 1
    rep.seconds = time.monotonic() - t0
    time.sleep(0.5)  # let the last connections' tasks end before measuring
    with contextlib.suppress(OSError, RuntimeError):  # gone (or a zombie)
        rep.rss_after_mb = rss_bytes(d.proc.pid) / 2**20
    if not d.alive():
        rep.exit_code = d.proc.returncode
        rep.died_after = rep.died_after or rep.tries
    rep.log_tail = "\n".join(d.log.read_text(errors="replace").splitlines()[-30:])
    return rep


def _vm_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


@dataclass
class BodiesReport:
    submits: int
    body_mb: int
    ok: int = 0
    seconds: float = 0.0
    rss_before_mb: float = 0.0
    peak_growth_mb: float = 0.0
    rss_after_mb: float = 0.0
    errors: list[str] = field(default_factory=list)


def large_bodies(d: Daemon, submits: int = 3, body_mb: int = 200) -> BodiesReport:
    """`submits` clients each submitting a job with a `body_mb` MB argument at once, with
    gpud's client (which waits out 503 busy). #10 measured 3 x 200 MB: a 1.34 GB peak and
    780 MB still held 10 s later."""
    import threading

    import cloudpickle  # type: ignore[import-untyped]  # ships no hints

    from gpud_client.client import Client
    from gpud_client.models import SubmitRequest

    assert d.proc is not None
    pid = d.proc.pid
    # The job is len() of the payload: by reference, nothing of this script travels.
    args = cloudpickle.dumps(((b"x" * (body_mb * 2**20 // 4 * 3),), {}))  # base64: 4/3
    request = SubmitRequest(
        name="attack.large",
        function=cloudpickle.dumps(len),
        args=args,
        python="{}.{}.{}".format(*sys.version_info[:3]),
    )
    rep = BodiesReport(submits, body_mb, rss_before_mb=_vm_mb(pid, "VmRSS"))
    hwm_before = _vm_mb(pid, "VmHWM")
    lock = threading.Lock()

    ids: list[int] = []

    def submit() -> None:
        try:
            with Client(f"unix://{d.socket}", timeout=300) as c:
                job = c.submit(request)
            with lock:
                rep.ok += 1
                ids.append(job.id)
        except Exception as e:  # noqa: BLE001 - reported
            with lock:
                rep.errors.append(f"{type(e).__name__}: {e}"[:300])

    t0 = time.monotonic()
    threads = [threading.Thread(target=submit) for _ in range(submits)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rep.seconds = time.monotonic() - t0
    rep.peak_growth_mb = _vm_mb(pid, "VmHWM") - max(hwm_before, rep.rss_before_mb)
    with Client(f"unix://{d.socket}", timeout=300) as c:
        for job_id in ids:  # the daemon holds a job's arguments until it has run
            while c.wait(job_id, timeout=30).state in ("queued", "running"):
                pass
    time.sleep(2)
    rep.rss_after_mb = _vm_mb(pid, "VmRSS")
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rounds",
        type=int,
        default=200,
        help="attacks per transport (Unix socket and TCP each); default 200",
    )
    ap.add_argument("--max-rss-growth-mb", type=float, default=20.0)
    ap.add_argument(
        "--bodies",
        type=int,
        default=3,
        help="then this many concurrent large submits (0: none); default 3",
    )
    ap.add_argument("--body-mb", type=int, default=200)
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    bodies = None
    with daemon() as d:
        rep = run(d, args.rounds)
        if args.bodies and rep.died_after is None:
            bodies = large_bodies(d, args.bodies, args.body_mb)
    ok = (
        rep.died_after is None
        and rep.unanswered == 0
        and rep.rss_growth_mb <= args.max_rss_growth_mb
        and (bodies is None or (bodies.ok == bodies.submits and not bodies.errors))
    )
    print(
        f"attacks: {rep.tries} ({args.rounds} over the Unix socket, {args.rounds} over TCP) "
        f"in {rep.seconds:.1f} s"
    )
    if rep.died_after is not None:
        print(f"DAEMON DIED after {rep.died_after} attacks, exit status {rep.exit_code}")
        print(rep.log_tail)
    else:
        print(f"daemon alive; health checks unanswered: {rep.unanswered}")
        print(
            f"RSS before {rep.rss_before_mb:.1f} MB, after {rep.rss_after_mb:.1f} MB, "
            f"growth {rep.rss_growth_mb:+.1f} MB (limit {args.max_rss_growth_mb:.0f} MB)"
        )
    if bodies is not None:
        print(
            f"{bodies.submits} concurrent submits of {bodies.body_mb} MB: {bodies.ok} "
            f"accepted in {bodies.seconds:.1f} s; daemon RSS {bodies.rss_before_mb:.0f} MB "
            f"before, peak +{bodies.peak_growth_mb:.0f} MB, {bodies.rss_after_mb:.0f} MB once "
            f"the jobs ran (#10 measured a 1.34 GB peak, 780 MB held 10 s later)"
        )
        for e in bodies.errors:
            print(f"  error: {e}")
    if args.json:
        out = asdict(rep) | {"ok": ok, "bodies": asdict(bodies) if bodies else None}
        args.json.write_text(json.dumps(out, indent=2))
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
