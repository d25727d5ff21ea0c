#!/usr/bin/env python3
"""The sweep acceptance of #12: a `.map` of 100,000 no-ops (warm workers, 2 CPU slots)
completes with every result correct, while ANOTHER user's `gpud ps` (`GET /v1/jobs`) and
`.remote()` keep answering.

    .venv/bin/python bench/hot_sweep.py [--quick] [--inputs N] [--raw out.json]

The sweep runs as this process's user on the daemon's Unix socket (root here: an admin).
The other user is a second gpud user, `nobody` on a root daemon (a real Unix account, so
its jobs can run) or `prober` otherwise, who calls over loopback TCP with an API token, as
`gpud admin user add` gives one. It runs in a process of its own (so that it shares no
GIL and no connection with the sweep): a first page of its jobs every 0.2 s, and a
`.remote()` of a CPU no-op every 2 s (0.5 s with --quick). That user has no usage and
the sweep's user is far over its share, so fair share must give the other user's job the
next free CPU slot: its figure is a cold start on a busy box, not a wait behind the sweep.
The queue wait of each of its jobs (QUEUED -> STARTING, from the ledger) is reported
beside it. The listing's p99 is the API target. ``--raw`` writes every sample with its
time (seconds from the sweep's start), to see when the slow ones happened.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gpud_client as gpud  # noqa: E402 - sys.path is set first
from bench.hotrows import Progress, Row, render  # noqa: E402 - sys.path is set first
from bench.run import Bench, pct  # noqa: E402 - sys.path is set first
from gpud.testing.daemon_proc import gpud_admin  # noqa: E402 - sys.path is set first
from gpud_client.client import Client  # noqa: E402 - sys.path is set first

if __name__ != "__main__":
    import cloudpickle  # type: ignore[import-untyped]  # ships no hints

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

TARGET_P99_MS = 50.0


def square(x: int) -> int:
    return x * x


def ping(x: int) -> int:
    return x


# -- the other user: a process of its own ---------------------------------------------------


def probe(interval: float) -> int:
    """Run as the other user (GPUD_URL and GPUD_TOKEN in the environment) until stdin
    closes; then print what it measured as one JSON line."""
    lat: list[tuple[float, float]] = []  # (when, ms)
    server: list[tuple[float, float]] = []  # (when, ms): the daemon's Server-Timing
    late: list[tuple[float, float]] = []  # (when, ms): how late this process woke up
    remote: list[tuple[float, float]] = []
    errors: list[str] = []
    stop = threading.Event()

    def lister() -> None:
        with Client() as c:
            # The daemon's own time for each answer (Server-Timing, gpud.loopwatch): the
            # rest of the client's time is the connection, the kernel and this process.
            seen: list[str] = []
            send = c._http.request

            def request(*args: Any, **kwargs: Any) -> Any:
                resp = send(*args, **kwargs)
                seen.append(resp.headers.get("server-timing") or "")
                return resp

            c._http.request = request  # type: ignore[method-assign]  # a bench's tap
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    c.list_jobs(limit=50)
                    now = time.time()
                    lat.append((now, (time.perf_counter() - t) * 1000.0))
                    if seen and seen[-1].startswith("app;dur="):
                        server.append((now, float(seen[-1].removeprefix("app;dur="))))
                except Exception as e:  # noqa: BLE001 - reported as a row's failure
                    errors.append(f"list: {type(e).__name__}: {e}")
                # A starved process wakes up late: that lateness is the CPU's, not gpud's.
                t = time.perf_counter()
                stop.wait(0.2)
                late.append((time.time(), (time.perf_counter() - t - 0.2) * 1000.0))

    def caller() -> None:
        f = gpud.function(name="bench.other")(ping)
        while not stop.is_set():
            t = time.perf_counter()
            try:
                if f.remote(7) != 7:
                    errors.append("the other user's .remote() was wrong")
                remote.append((time.time(), (time.perf_counter() - t) * 1000.0))
            except Exception as e:  # noqa: BLE001 - reported as a row's failure
                errors.append(f"remote: {type(e).__name__}: {e}")
            stop.wait(interval)
        f.client.close()

    sides = [threading.Thread(target=t, daemon=True) for t in (lister, caller)]
    for t in sides:
        t.start()
    print("ready", flush=True)
    sys.stdin.read()  # the parent closes it when the sweep is over
    stop.set()
    for t in sides:
        t.join(120)
    print(
        json.dumps(
            {"lat": lat, "server": server, "late": late, "remote": remote, "errors": errors}
        ),
        flush=True,
    )
    return 0


def _add_user(data_dir: Path) -> tuple[str, str]:
    """The other gpud user and its token, added as an admin would (`gpud admin user
    add`). On a root daemon a user's jobs run as their Unix account: `nobody` has one."""
    name = "nobody" if os.geteuid() == 0 else "prober"
    return name, gpud_admin(data_dir, "user", "add", name, "--no-token-file", cwd=REPO)


def _queue_waits(ledger: Path, owner: str) -> list[tuple[float, float]]:
    """When each of ``owner``'s jobs was queued, and how many milliseconds it waited in
    the queue (QUEUED -> STARTING)."""
    con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT j.id, e.to_state, e.at FROM jobs j JOIN events e ON e.job_id = j.id "
            "WHERE j.owner = ? ORDER BY e.id",
            (owner,),
        ).fetchall()
    finally:
        con.close()
    queued: dict[int, float] = {}
    out: list[tuple[float, float]] = []
    for job_id, state, at in rows:
        if state == "queued":
            queued.setdefault(job_id, at)
        elif state == "starting" and job_id in queued:
            q = queued.pop(job_id)
            out.append((q, (at - q) * 1000.0))
    return out


def _schedstat(pid: int, tid: int | None = None) -> tuple[float, float]:
    """Seconds on a CPU and seconds runnable but waiting for one, of a process's threads
    (or one thread), from the kernel's /proc/PID/task/TID/schedstat."""
    tasks = [tid] if tid is not None else [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    ran = waited = 0.0
    for t in tasks:
        try:
            fields = Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()
        except OSError:
            continue  # a thread that ended meanwhile
        ran += int(fields[0]) / 1e9
        waited += int(fields[1]) / 1e9
    return ran, waited


def _stalls(log: str) -> list[tuple[float, float, str]]:
    """The loop stalls the daemon logged (``loop_stall_log``, gpud.loopwatch): wall ms,
    the loop thread's CPU ms, task."""
    out: list[tuple[float, float, str]] = []
    for line in log.splitlines():
        if "loop stall: " in line:
            head, _, task = line.split("loop stall: ", 1)[1].partition(" in one step of task ")
            ms, _, cpu = head.partition(" ms (cpu ")
            out.append((float(ms), float(cpu.removesuffix(" ms)")), task.strip()))
    return out


def _gc_pauses(log: str) -> list[tuple[float, int]]:
    """The cyclic GC's collections the daemon logged as longer than ``loop_stall_log``
    (gpud.loopwatch): ms, generation. Each is inside one of the stalls."""
    out: list[tuple[float, int]] = []
    for line in log.splitlines():
        if "gc pause: " in line:
            ms, _, rest = line.split("gc pause: ", 1)[1].partition(" ms (generation ")
            out.append((float(ms), int(rest.split(",", 1)[0])))
    return out


def rows(
    quick: bool,
    progress: Progress,
    inputs: int | None = None,
    raw: Path | None = None,
    stall_log: float | None = None,
) -> list[Row]:
    os.environ.setdefault("GPUD_JOB_PYTHON", "daemon")
    n = inputs if inputs is not None else (2_000 if quick else 100_000)
    base = Path(tempfile.mkdtemp(prefix="gpud-hotsweep-", dir="/tmp"))
    os.chmod(base, 0o755)
    bench = Bench(base)
    other: subprocess.Popen[str] | None = None
    try:
        env = {"GPUD_LOOP_STALL_LOG": str(stall_log)} if stall_log else None
        with bench.daemon("sweep", 2, env, tcp=True) as d:
            owner, token = _add_user(d.data_dir)
            env = dict(os.environ, GPUD_URL=d.tcp_url, GPUD_TOKEN=token)
            other = subprocess.Popen(
                [sys.executable, __file__, "--probe", "--interval", "0.5" if quick else "2"],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=str(REPO),
            )
            assert other.stdin is not None and other.stdout is not None
            if other.stdout.readline().strip() != "ready":
                raise RuntimeError("the other user's probe did not start")
            sq = gpud.function(name="bench.square", url=d.url, keep_warm=300)(square)
            sq.remote(1)  # a warm worker up before the clock starts
            progress(
                f"sweep: .map of {n:,} no-ops on warm workers, 2 slots; user {owner} "
                "probes over TCP"
            )
            assert d.proc is not None
            # The daemon's event loop (its main thread) and the probe: time on a CPU and
            # time runnable but waiting for one (the kernel's accounting).
            loop0, probe0 = _schedstat(d.proc.pid, d.proc.pid), _schedstat(other.pid)
            t0, wall0 = time.perf_counter(), time.time()
            wrong = sum(1 for i, r in enumerate(sq.map(range(n), progress=False)) if r != i * i)
            wall = time.perf_counter() - t0
            loop1, probe1 = _schedstat(d.proc.pid, d.proc.pid), _schedstat(other.pid)
            cpu = {
                "loop_ran_s": loop1[0] - loop0[0],
                "loop_waited_s": loop1[1] - loop0[1],
                "probe_ran_s": probe1[0] - probe0[0],
                "probe_waited_s": probe1[1] - probe0[1],
            }
            out, _ = other.communicate(timeout=180)
            sq.client.close()
            timed_waits = _queue_waits(d.data_dir / "ledger.db", owner)
            daemon_log = d.log_since()
            stalls, gc_pauses = _stalls(daemon_log), _gc_pauses(daemon_log)
            progress(f"sweep done in {wall:.0f} s; removing its {n:,} jobs' directories")
    finally:
        if other is not None and other.poll() is None:
            other.send_signal(signal.SIGKILL)
            other.wait()
        bench.stop_all()
        shutil.rmtree(base, ignore_errors=True)
    got: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if raw is not None:
        raw.write_text(
            json.dumps(
                {
                    "inputs": n,
                    "wall_s": wall,
                    "wrong": wrong,
                    "errors": got["errors"],
                    "stalls": stalls,
                    "gc_pauses": gc_pauses,
                    "cpu": cpu,
                    "load": os.getloadavg(),
                    **{
                        k: [(round(at - wall0, 3), round(ms, 2)) for at, ms in v]
                        for k, v in (
                            ("list_ms", got["lat"]),
                            ("remote_ms", got["remote"]),
                            ("queued_ms", timed_waits),
                            ("server_ms", got["server"]),
                            ("late_ms", got["late"]),
                        )
                    },
                }
            )
        )
    lat: list[float] = [ms for _, ms in got["lat"]]
    remote: list[float] = [ms for _, ms in got["remote"]]
    waits = [ms for _, ms in timed_waits]
    server = [ms for _, ms in got["server"]]
    late = [ms for _, ms in got["late"]]
    errors: list[str] = got["errors"]
    p99 = pct(lat, 99) if lat else float("inf")
    return [
        Row(
            measure=f".map of {n:,} no-ops completes, every result correct",
            figure=f"{wall:.0f} s ({n / wall:.0f} jobs/s), {wrong} wrong",
            baseline="-",
            target="0 wrong",
            ok=wrong == 0,
            numbers={"wall_s": wall, "wrong": float(wrong), "inputs": float(n)},
        ),
        Row(
            measure="  meanwhile another user's GET /v1/jobs (TCP, token)",
            figure=f"p50 {pct(lat, 50):.1f} / p99 {p99:.1f} / max {max(lat):.1f} ms "
            f"({len(lat)} req)"
            if lat
            else "no answer",
            baseline="-",
            target=f"p99 < {TARGET_P99_MS:g} ms",
            ok=not errors and p99 < TARGET_P99_MS,
            numbers={
                "p50_ms": pct(lat, 50) if lat else 0.0,
                "p99_ms": p99,
                "max_ms": max(lat) if lat else 0.0,
                "requests": float(len(lat)),
            },
        ),
        _spread_row("    of which the daemon's (Server-Timing)", server, "no header"),
        _spread_row("    the probe's lateness waking (its CPU wait)", late, "-"),
        Row(
            measure="    daemon's loop thread: on a CPU / waiting for one",
            figure=f"{cpu['loop_ran_s']:.1f} s ({cpu['loop_ran_s'] / wall:.0%} of the sweep) / "
            f"{cpu['loop_waited_s']:.1f} s; probe {cpu['probe_ran_s']:.1f} / "
            f"{cpu['probe_waited_s']:.1f} s; load {os.getloadavg()[0]:.1f}",
            baseline="-",
            target="-",
            ok=True,
            numbers=cpu,
        ),
        Row(
            measure="    daemon loop stalls (steps > loop_stall_log)",
            figure=(
                f"{len(stalls)}, {sum(ms for ms, _, _ in stalls) / 1000:.1f} s in all "
                f"(cpu {sum(c for _, c, _ in stalls) / 1000:.1f} s), "
                f"max {max(ms for ms, _, _ in stalls):.0f} ms ({_worst_tasks(stalls)}); "
                f"of which GC: {len(gc_pauses)}, max "
                f"{max((ms for ms, _ in gc_pauses), default=0.0):.0f} ms"
                if stalls
                else "none"
            )
            if stall_log
            else "not logged (--stall-log)",
            baseline="-",
            target="-",
            ok=True,
            numbers={"count": float(len(stalls))},
        ),
        Row(
            measure="  meanwhile its .remote() (a cold start, fair share first)",
            figure=(
                f"p50 {pct(remote, 50):.0f} / p90 {pct(remote, 90):.0f} / "
                f"max {max(remote):.0f} ms "
                f"({len(remote)} calls)"
                if remote
                else "no call"
            )
            + (f"; errors: {errors[0]}" if errors else ""),
            baseline="-",
            target="answers, correct",
            ok=bool(remote) and not errors,
            numbers={
                "calls": float(len(remote)),
                "p50_ms": pct(remote, 50) if remote else 0.0,
                "max_ms": max(remote) if remote else 0.0,
            },
        ),
        Row(
            measure="    of which queued (QUEUED -> STARTING)",
            figure=(
                f"p50 {pct(waits, 50):.0f} / p90 {pct(waits, 90):.0f} / "
                f"max {max(waits):.0f} ms "
                f"({len(waits)} jobs)"
                if waits
                else "no job"
            ),
            baseline="-",
            target="not behind the sweep (< 1 s)",
            ok=bool(waits) and max(waits) < 1000.0,
            numbers={
                "p50_ms": pct(waits, 50) if waits else 0.0,
                "max_ms": max(waits) if waits else 0.0,
            },
        ),
    ]


def _spread_row(measure: str, ms: list[float], empty: str) -> Row:
    """An information row (no target): p50 / p99 / max of ``ms``, or ``empty`` without
    samples."""
    return Row(
        measure=measure,
        figure=f"p50 {pct(ms, 50):.1f} / p99 {pct(ms, 99):.1f} / max {max(ms):.1f} ms"
        if ms
        else empty,
        baseline="-",
        target="-",
        ok=True,
        numbers={
            "p50_ms": pct(ms, 50) if ms else 0.0,
            "p99_ms": pct(ms, 99) if ms else 0.0,
        },
    )


def _worst_tasks(stalls: list[tuple[float, float, str]]) -> str:
    """The tasks that stalled the loop longest, in all: "name 1.2 s, ..." (three)."""
    by: dict[str, float] = {}
    for ms, _, task in stalls:
        short = task.rsplit(".", 1)[-1]
        by[short] = by.get(short, 0.0) + ms
    top = sorted(by.items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{name} {ms / 1000:.1f} s" for name, ms in top)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--inputs", type=int, default=None)
    p.add_argument(
        "--raw",
        type=Path,
        default=None,
        help="write every sample, with its time, to this JSON file",
    )
    p.add_argument(
        "--stall-log",
        type=float,
        default=None,
        metavar="SECONDS",
        help="have the daemon log loop steps longer than this (loop_stall_log), and count them",
    )
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.probe:
        return probe(a.interval)
    result: Any = rows(a.quick, lambda s: print(s, file=sys.stderr), a.inputs, a.raw, a.stall_log)
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
