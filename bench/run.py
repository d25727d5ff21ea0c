#!/usr/bin/env python3
"""gpud's benchmark: latency and throughput of tiny jobs, against the bare-subprocess
baselines measured in the same run, on the same machine.

    .venv/bin/python bench/run.py [--quick] [--json results.json]

It starts its own `gpud serve` subprocesses (fake GPUs, a temporary data directory under
/tmp) and stops them, and removes the directory, when it ends, also on an error or Ctrl-C.
As root with Podman and the image localhost/gpud-python:X.Y present, it also measures the
Podman executor against the process executor (`--no-podman` skips that).
See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cloudpickle  # type: ignore[import-untyped]  # noqa: E402 - sys.path is set first

import gpud_client as gpud  # noqa: E402 - sys.path is set first
from gpud.testing.daemon_proc import DaemonProc  # noqa: E402 - sys.path is set first
from gpud_client.client import Client  # noqa: E402 - sys.path is set first

#: The issue's later target for `.map` throughput of no-op jobs.
MAP_TARGET_PER_S = 500.0
CORES = os.cpu_count() or 1
#: The image the Podman executor's jobs run in when a job names none (gpud's default).
PODMAN_IMAGE = "localhost/gpud-python:{}.{}".format(*sys.version_info)


# -- the functions being run ------------------------------------------------------------


def noop(x: Any = None) -> Any:
    return x


def blocker() -> None:
    """Holds the only CPU slot so that submitted jobs stay queued (submit-only runs)."""
    import time as _t

    _t.sleep(3600)


# -- statistics ---------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between order statistics."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency(samples_s: list[float]) -> dict[str, Any]:
    ms = [s * 1000.0 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": pct(ms, 50),
        "p95_ms": pct(ms, 95),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
    }


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# -- daemons ----------------------------------------------------------------------------


#: The benchmarks' daemon settings: fake GPUs, a short kill grace.
BENCH_SETTINGS = {
    "GPUD_GPUS": "fake",
    "GPUD_FAKE_GPUS": "h100,h100",
    "GPUD_KILL_GRACE": "1",
    "GPUD_LOG_LEVEL": "info",
}


class Daemon(DaemonProc):
    """One `gpud serve` subprocess (gpud.testing.daemon_proc) with fake GPUs on its own
    directory ``base/name``, in a session of its own. Stopping it also ends what it left:
    its jobs, and its containers and Podman service."""

    def __init__(
        self,
        base: Path,
        name: str,
        cpu_slots: int,
        env: dict[str, str] | None = None,
        *,
        tcp: bool = False,
    ) -> None:
        super().__init__(
            base / name,
            env=dict(env or {}),
            settings={**BENCH_SETTINGS, "GPUD_CPU_SLOTS": str(cpu_slots)},
            own_session=True,
            tcp=tcp,
        )
        self.name = name
        self.cpu_slots = cpu_slots

    @property
    def dir(self) -> Path:
        return self.base

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        super().stop(sig, grace)
        # Jobs outlive a stopped daemon by design (the next one re-adopts them).
        self.kill_jobs()
        if self.executor == "podman":
            self.remove_containers()


def podman_problem() -> str | None:
    """Why the Podman executor cannot be measured here, or None when it can."""
    if os.geteuid() != 0:
        return "the Podman executor needs rootful Podman (run the benchmark as root)"
    if shutil.which("podman") is None:
        return "podman is not installed (../shared/ci/podman-host-setup.sh --image)"
    try:
        import podman  # noqa: F401 - only whether it imports
    except ImportError:
        return "podman-py is not installed in this Python (pip install podman)"
    probe = subprocess.run(["podman", "image", "exists", PODMAN_IMAGE], capture_output=True)
    if probe.returncode != 0:
        return (
            f"image {PODMAN_IMAGE} is missing (../shared/ci/podman-host-setup.sh --image builds it)"
        )
    return None


class Bench:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.daemons: list[Daemon] = []

    @contextlib.contextmanager
    def daemon(
        self, name: str, cpu_slots: int, env: dict[str, str] | None = None, *, tcp: bool = False
    ) -> Iterator[Daemon]:
        d = Daemon(self.base, name, cpu_slots, env, tcp=tcp)
        self.daemons.append(d)
        try:
            d.start()
            yield d
        finally:
            d.stop()
            self.daemons.remove(d)

    def stop_all(self) -> None:
        for d in list(self.daemons):
            with contextlib.suppress(Exception):
                d.stop()


# -- measurements ---------------------------------------------------------------------------

_CLOUDPICKLE_CHILD = (
    "import sys, pickle\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "f, args = pickle.loads(sys.stdin.buffer.read())\n"
    "sys.stdout.buffer.write(pickle.dumps(f(*args)))\n"
)


def cloudpickle_child(python: str, base: Path) -> Callable[[], None]:
    """One baseline call: a child that unpickles a cloudpickled function (which imports
    cloudpickle, from a private copy under ``base`` as gpud's worker does), runs it and
    pickles the result back: what a job costs at least when every job is a fresh
    interpreter. Warm it (two calls) before timing it."""
    libdir = base / "baseline-lib"
    if not libdir.exists():
        shutil.copytree(
            Path(cloudpickle.__file__).parent,
            libdir / "cloudpickle",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        os.chmod(libdir, 0o755)
    # By value, as gpud ships it: the child need not import this script.
    if noop.__module__ != "__main__":  # imported as bench.run (e.g. by a test)
        cloudpickle.register_pickle_by_value(sys.modules[noop.__module__])
    payload = cloudpickle.dumps((noop, (1,)))

    def one() -> None:
        r = subprocess.run(
            [python, "-c", _CLOUDPICKLE_CHILD, str(libdir)],
            input=payload,
            capture_output=True,
            check=True,
        )
        if cloudpickle.loads(r.stdout) != 1:
            raise RuntimeError("the baseline child returned a wrong value")

    return one


def measure_baselines(n: int, python: str, base: Path) -> dict[str, Any]:
    """Bare `python -c pass`, and :func:`cloudpickle_child`, each ``n`` times in a row."""
    one = cloudpickle_child(python, base)

    def bare() -> None:
        subprocess.run([python, "-c", "pass"], check=True)

    timed(bare, 2)  # warm the page cache (and compile the copy's .pyc files)
    timed(one, 2)
    return {"pass": latency(timed(bare, n)), "cloudpickle": latency(timed(one, n))}


def worker_python(d: Daemon) -> str:
    """The interpreter the daemon runs jobs with, from its start-up line."""
    m = re.search(r"worker Python \S+ \((.+?)\) as ", d.log.read_text(errors="replace"))
    return m.group(1) if m else sys.executable


def phases(d: Daemon, job_ids: list[int]) -> dict[str, float]:
    """Median milliseconds between a job's state changes, from the ledger's event log
    (diagnostics only: where a round trip's time goes inside the daemon)."""
    import sqlite3

    out: dict[str, list[float]] = {}
    con = sqlite3.connect(f"file:{d.data_dir / 'ledger.db'}?mode=ro", uri=True)
    try:
        for job_id in job_ids:
            ev = con.execute(
                "SELECT to_state, at FROM events WHERE job_id = ? ORDER BY id", (job_id,)
            ).fetchall()
            for (a, ta), (b, tb) in zip(ev, ev[1:], strict=False):
                out.setdefault(f"{a}->{b}_ms", []).append((tb - ta) * 1000.0)
    finally:
        con.close()
    return {k: statistics.median(v) for k, v in out.items()}


def _function(url: str) -> gpud.Function[..., Any]:
    return gpud.function(name="bench.noop", url=url)(noop)


def measure_remote(d: Daemon, n: int, warmup: int) -> tuple[dict[str, Any], dict[str, Any]]:
    f = _function(d.url)
    for _ in range(warmup):
        if f.remote(1) != 1:
            raise RuntimeError(".remote() returned a wrong value")
    remote = timed(lambda: f.remote(1), n)
    # The same without streaming the log to stderr (`.remote()` opens a second
    # connection for that): spawn, then wait and fetch the result.
    for _ in range(min(warmup, 2)):
        f.spawn(1).get()
    ids: list[int] = []

    def spawn_get() -> None:
        h = f.spawn(1)
        h.get()
        ids.append(h.id)

    sg = timed(spawn_get, n)
    # The caller's share of a submit: pickling the function and its arguments.
    prep = timed(lambda: f.submit_request((1,), {}), n)
    f.client.close()
    metrics = {"remote": latency(remote), "spawn_get": latency(sg)}
    diag: dict[str, Any] = {"client_submit_prep": latency(prep)}
    with contextlib.suppress(Exception):
        diag["spawn_get_daemon_phases"] = phases(d, ids)
    return metrics, diag


def measure_map(d: Daemon, inputs: int) -> dict[str, Any]:
    f = _function(d.url)
    f.remote(0)  # connect and check the worker Python outside the timing
    t0 = time.perf_counter()
    results = list(f.map(range(inputs)))
    wall = time.perf_counter() - t0
    f.client.close()
    if results != list(range(inputs)):
        raise RuntimeError("map returned wrong results")
    return {"inputs": inputs, "cpu_slots": d.cpu_slots, "wall_s": wall, "jobs_per_s": inputs / wall}


def measure_warm(d: Daemon, n: int, warmup: int, inputs: int) -> dict[str, Any]:
    """The same no-op with keep_warm: calls after the first run in a kept worker."""
    f = gpud.function(name="bench.noop_warm", url=d.url, keep_warm=300)(noop)
    for _ in range(max(1, warmup)):
        f.remote(1)  # the first call starts the warm worker
    remote = timed(lambda: f.remote(1), n)
    sg = timed(lambda: f.spawn(1).get(), n)
    f.map(range(min(inputs, 20)))  # warm a worker per CPU slot
    t0 = time.perf_counter()
    results = list(f.map(range(inputs)))
    wall = time.perf_counter() - t0
    f.client.close()
    if results != list(range(inputs)):
        raise RuntimeError("map returned wrong results")
    return {
        "remote_warm": latency(remote),
        "spawn_get_warm": latency(sg),
        "map_warm": {
            "inputs": inputs,
            "cpu_slots": d.cpu_slots,
            "wall_s": wall,
            "jobs_per_s": inputs / wall,
        },
    }


def measure_submit(d: Daemon, n_spawn: int, batch: int) -> dict[str, Any]:
    """Submits only: the daemon has one CPU slot, held by a sleeping job, so every job
    submitted here stays queued and the numbers are the durable-submit path alone."""
    f = _function(d.url)
    hold = gpud.function(name="bench.blocker", url=d.url)(blocker)
    held = hold.spawn()
    deadline = time.monotonic() + 30
    while held.status().state != "running":
        if time.monotonic() > deadline:
            raise RuntimeError(f"the blocker job did not start: {held.status()}")
        time.sleep(0.02)
    f._ready_client()  # connection made and the worker's Python checked: not timed

    per: list[float] = []
    t0 = time.perf_counter()
    for i in range(n_spawn):
        t = time.perf_counter()
        f.spawn(i)
        per.append(time.perf_counter() - t)
    spawn_wall = time.perf_counter() - t0

    t0 = time.perf_counter()
    handles = f.map(range(batch))  # returns once the daemon acknowledged every job
    batch_ack = time.perf_counter() - t0
    del handles

    with Client(d.url) as c:
        queued = 0
        cursor = None
        while True:
            page = c.list_jobs(state="queued", limit=1000, cursor=cursor)
            queued += len(page.jobs)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    if queued != n_spawn + batch:
        raise RuntimeError(f"expected {n_spawn + batch} queued jobs, the daemon has {queued}")
    with contextlib.suppress(Exception):
        held.cancel_quietly(timeout=10)
    f.client.close()
    hold.client.close()
    return {
        "spawn_submit": {
            **latency(per),
            "wall_s": spawn_wall,
            "submits_per_s": n_spawn / spawn_wall,
        },
        "batch_submit": {"inputs": batch, "ack_s": batch_ack, "jobs_per_s": batch / batch_ack},
    }


# -- report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    baseline: int
    remote: int
    warmup: int
    map_inputs: int
    spawn: int
    batch: int
    podman: int  # .remote() and .spawn().get() calls on the Podman executor, each


FULL = Sizes(baseline=50, remote=100, warmup=5, map_inputs=1000, spawn=500, batch=1000, podman=100)
QUICK = Sizes(baseline=8, remote=8, warmup=2, map_inputs=60, spawn=40, batch=200, podman=8)

#: (metric of the Podman executor, the same metric of the process executor, label)
PODMAN_PAIRS = (
    ("podman_remote", "remote", ".remote()"),
    ("podman_spawn_get", "spawn_get", ".spawn().get()"),
)


def ratios(m: dict[str, Any]) -> dict[str, float]:
    cp = m["baseline_subprocess_cloudpickle"]["p50_ms"]
    wcp = m["baseline_worker_python_cloudpickle"]["p50_ms"]
    return {
        # as the issue asks: against `sys.executable` running the same function
        "remote_p50_over_subprocess_cloudpickle_p50": m["remote"]["p50_ms"] / cp,
        # against the interpreter the daemon's jobs actually run with
        "remote_p50_over_worker_python_cloudpickle_p50": m["remote"]["p50_ms"] / wcp,
        "spawn_get_p50_over_worker_python_cloudpickle_p50": m["spawn_get"]["p50_ms"] / wcp,
        "remote_p50_minus_worker_python_cloudpickle_p50_ms": m["remote"]["p50_ms"] - wcp,
        "remote_p50_minus_worker_python_pass_p50_ms": m["remote"]["p50_ms"]
        - m["baseline_worker_python_pass"]["p50_ms"],
        "map_cores_over_target": m["map_cores"]["jobs_per_s"] / MAP_TARGET_PER_S,
        "map_4x_over_target": m["map_4x"]["jobs_per_s"] / MAP_TARGET_PER_S,
        "remote_warm_p50_over_worker_python_cloudpickle_p50": m["remote_warm"]["p50_ms"] / wcp,
        "remote_warm_p50_over_remote_p50": m["remote_warm"]["p50_ms"] / m["remote"]["p50_ms"],
        "map_warm_over_target": m["map_warm"]["jobs_per_s"] / MAP_TARGET_PER_S,
        **podman_ratios(m),
    }


def podman_ratios(m: dict[str, Any]) -> dict[str, float]:
    """The Podman executor's per-job overhead over the process executor: podman - process
    (ms) and podman / process, at p50 and p95; empty when Podman was not measured."""
    out: dict[str, float] = {}
    for pod, proc, _ in PODMAN_PAIRS:
        if pod not in m:
            continue
        for q in ("p50", "p95"):
            a, b = m[pod][f"{q}_ms"], m[proc][f"{q}_ms"]
            out[f"{pod}_{q}_minus_process_{q}_ms"] = a - b
            out[f"{pod}_{q}_over_process_{q}"] = a / b
    return out


def render(result: dict[str, Any]) -> str:
    m, r, meta = result["metrics"], result["ratios"], result["meta"]
    same = os.path.realpath(meta["bench_python"]) == os.path.realpath(meta["worker_python"])
    w = 50
    out = [
        f"gpud benchmark: {meta['cores']} cores, Python {meta['python']}, "
        f"{'quick' if meta['quick'] else 'full'} run, {meta['elapsed_s']:.0f} s",
        f"  bench python (sys.executable): {meta['bench_python']}",
        f"  jobs' python (the daemon's):   {meta['worker_python']}"
        + ("  (the same)" if same else ""),
        "",
        f"{'latency':<{w}}{'p50':>10}{'p95':>10}",
    ]

    def lat(key: str, label: str) -> None:
        v = m[key]
        out.append(f"{label:<{w}}{v['p50_ms']:>7.1f} ms{v['p95_ms']:>7.1f} ms  n={v['n']}")

    lat("baseline_subprocess_pass", "subprocess `python -c pass`, bench python")
    lat("baseline_subprocess_cloudpickle", "subprocess unpickle+run+pickle, bench python")
    if not same:
        lat("baseline_worker_python_pass", "subprocess `python -c pass`, jobs' python")
        lat("baseline_worker_python_cloudpickle", "subprocess unpickle+run+pickle, jobs' python")
    lat("remote", "gpud .remote() round trip (sequential)")
    lat("spawn_get", "gpud .spawn().get() (no log streaming)")
    lat("spawn_submit", "gpud .spawn() until acknowledged (durable)")
    lat("remote_warm", "gpud .remote(), warm worker (keep_warm)")
    lat("spawn_get_warm", "gpud .spawn().get(), warm worker")
    if "podman_remote" in m:
        lat("podman_remote", "gpud .remote(), Podman executor")
        lat("podman_spawn_get", "gpud .spawn().get(), Podman executor")
    out += ["", f"{'throughput':<{w}}{'rate':>10}{'wall':>10}"]
    for key in ("map_cores", "map_4x", "map_warm"):
        v = m[key]
        label = "map of {} no-ops, cpu_slots={}{}".format(
            v["inputs"], v["cpu_slots"], ", warm workers" if key == "map_warm" else ""
        )
        out.append(f"{label:<{w}}{v['jobs_per_s']:>8.1f}/s{v['wall_s']:>8.2f} s")
    s = m["spawn_submit"]
    label = ".spawn() x{}, one by one, acknowledged".format(s["n"])
    out.append(f"{label:<{w}}{s['submits_per_s']:>8.1f}/s{s['wall_s']:>8.2f} s")
    b = m["batch_submit"]
    label = "one batch submit of {} inputs, acknowledged".format(b["inputs"])
    out.append(f"{label:<{w}}{b['jobs_per_s']:>8.0f}/s{b['ack_s']:>8.3f} s")
    out += [
        "",
        "ratios",
        f"  {'remote p50 / subprocess+cloudpickle p50, bench python':<58}"
        f"{r['remote_p50_over_subprocess_cloudpickle_p50']:.2f}x",
        f"  {'remote p50 / subprocess+cloudpickle p50, jobs python':<58}"
        f"{r['remote_p50_over_worker_python_cloudpickle_p50']:.2f}x "
        f"({r['remote_p50_minus_worker_python_cloudpickle_p50_ms']:+.1f} ms; "
        f"spawn+get {r['spawn_get_p50_over_worker_python_cloudpickle_p50']:.2f}x)",
        f"  {'remote p50 - `python -c pass` p50, jobs python':<58}"
        f"{r['remote_p50_minus_worker_python_pass_p50_ms']:+.1f} ms",
        f"  {f'map jobs/s / the {MAP_TARGET_PER_S:.0f}/s target':<58}"
        f"{r['map_cores_over_target']:.3f}x at cpu_slots={m['map_cores']['cpu_slots']}, "
        f"{r['map_4x_over_target']:.3f}x at cpu_slots={m['map_4x']['cpu_slots']}, "
        f"{r['map_warm_over_target']:.3f}x warm",
        f"  {'warm remote p50 / subprocess+cloudpickle p50, jobs python':<58}"
        f"{r['remote_warm_p50_over_worker_python_cloudpickle_p50']:.2f}x "
        f"(warm / cold remote: {r['remote_warm_p50_over_remote_p50']:.2f}x)",
    ]
    if "podman_remote" in m:
        out += [
            "",
            f"{'Podman executor overhead (podman - process)':<{w}}"
            f"{'p50':>10}{'p95':>10}{'ratio p50':>11}{'ratio p95':>11}",
        ]
        for pod, _, label in PODMAN_PAIRS:
            out.append(
                f"{'  ' + label:<{w}}"
                f"{r[f'{pod}_p50_minus_process_p50_ms']:>+7.1f} ms"
                f"{r[f'{pod}_p95_minus_process_p95_ms']:>+7.1f} ms"
                f"{r[f'{pod}_p50_over_process_p50']:>10.2f}x"
                f"{r[f'{pod}_p95_over_process_p95']:>10.2f}x"
            )
    else:
        out += ["", f"Podman executor: not measured ({meta.get('podman_skipped') or 'skipped'})"]
    d = result.get("diagnostics") or {}
    if d:
        out += ["", "diagnostics"]
        if "client_submit_prep" in d:
            out.append(
                f"  caller's pickling per .spawn(): p50 {d['client_submit_prep']['p50_ms']:.1f} ms"
            )
        for key, which in (
            ("spawn_get_daemon_phases", ""),
            ("podman_spawn_get_daemon_phases", ", Podman"),
        ):
            if d.get(key):
                out.append(
                    f"  daemon phases of .spawn().get(){which}, p50 (ledger events): "
                    + ", ".join(f"{k.removesuffix('_ms')} {v:.1f} ms" for k, v in d[key].items())
                )
    return "\n".join(out)


def measure_podman(
    bench: Bench, sizes: Sizes, progress: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same .remote() and .spawn().get() round trips as `remote`/`spawn_get`, on a
    daemon with executor = "podman": every job a fresh container. The daemon starts its
    own `podman system service` on a private socket (podman_start_service), stopped again
    with it, so nothing of the machine's own Podman service is touched."""
    env = {
        "GPUD_EXECUTOR": "podman",
        "GPUD_PODMAN_START_SERVICE": "1",
        "GPUD_PODMAN_URL": f"unix://{bench.base / 'podman' / 'podman.sock'}",
        "GPUD_DEFAULT_IMAGE": PODMAN_IMAGE,
    }
    with bench.daemon("podman", CORES, env=env) as d:
        progress(
            f"podman: {min(sizes.warmup, 2)} warm-up + {sizes.podman} calls, twice, "
            f"each job a container of {PODMAN_IMAGE}"
        )
        m, dg = measure_remote(d, sizes.podman, min(sizes.warmup, 2))
    metrics = {"podman_remote": m["remote"], "podman_spawn_get": m["spawn_get"]}
    diag = {}
    if "spawn_get_daemon_phases" in dg:
        diag["podman_spawn_get_daemon_phases"] = dg["spawn_get_daemon_phases"]
    return metrics, diag


def run(
    sizes: Sizes, quick: bool, progress: Callable[[str], None], podman: bool = True
) -> dict[str, Any]:
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="gpud-bench-", dir="/tmp"))
    # As root the daemon runs jobs as `nobody`, who must traverse down to its job dirs.
    os.chmod(base, 0o755)
    progress(f"working in {base} (removed at the end)")
    bench = Bench(base)
    metrics: dict[str, Any] = {}
    diag: dict[str, Any] = {}
    job_python = sys.executable
    podman_skipped = None if podman else "--no-podman"
    if podman_skipped is None:
        podman_skipped = podman_problem()
        if podman_skipped is not None:
            progress(f"skipping the Podman executor: {podman_skipped}")
    try:
        with bench.daemon("main", CORES) as d:
            job_python = worker_python(d)
            progress(f"baselines: {sizes.baseline} subprocesses of each kind with {sys.executable}")
            b = measure_baselines(sizes.baseline, sys.executable, base)
            metrics["baseline_subprocess_pass"] = b["pass"]
            metrics["baseline_subprocess_cloudpickle"] = b["cloudpickle"]
            if os.path.realpath(job_python) != os.path.realpath(sys.executable):
                progress(f"baselines again with the jobs' interpreter, {job_python}")
                b = measure_baselines(sizes.baseline, job_python, base)
            metrics["baseline_worker_python_pass"] = b["pass"]
            metrics["baseline_worker_python_cloudpickle"] = b["cloudpickle"]
            progress(f"remote: {sizes.warmup} warm-up + {sizes.remote} calls, twice")
            m, dg = measure_remote(d, sizes.remote, sizes.warmup)
            metrics.update(m)
            diag.update(dg)
            progress(f"map: {sizes.map_inputs} inputs, cpu_slots={CORES}")
            metrics["map_cores"] = measure_map(d, sizes.map_inputs)
            progress("warm workers (keep_warm): remote, spawn+get, map")
            metrics.update(measure_warm(d, sizes.remote, sizes.warmup, sizes.map_inputs))
        if podman_skipped is None:
            m, dg = measure_podman(bench, sizes, progress)
            metrics.update(m)
            diag.update(dg)
        with bench.daemon("wide", 4 * CORES) as d:
            progress(f"map: {sizes.map_inputs} inputs, cpu_slots={4 * CORES}")
            metrics["map_4x"] = measure_map(d, sizes.map_inputs)
        with bench.daemon("submit", 1) as d:
            progress(f"submit: {sizes.spawn} spawns, then a batch of {sizes.batch}")
            metrics.update(measure_submit(d, sizes.spawn, sizes.batch))
    finally:
        bench.stop_all()
        shutil.rmtree(base, ignore_errors=True)
    return {
        "meta": {
            "quick": quick,
            "cores": CORES,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "user": "root" if os.geteuid() == 0 else "non-root",
            "sizes": sizes.__dict__,
            "bench_python": sys.executable,
            "worker_python": job_python,
            "map_target_per_s": MAP_TARGET_PER_S,
            "podman_image": PODMAN_IMAGE if podman_skipped is None else None,
            "podman_skipped": podman_skipped,
            "timestamp": time.time(),
            "elapsed_s": time.perf_counter() - started,
        },
        "metrics": metrics,
        "ratios": ratios(metrics),
        "diagnostics": diag,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small N: a smoke run (<~90 s)")
    p.add_argument(
        "--no-podman", action="store_true", help="skip the Podman executor's measurements"
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    for name, help_ in (
        ("baseline", "subprocess baseline runs"),
        ("remote", ".remote() calls measured"),
        ("map-inputs", ".map inputs"),
        ("spawn", "sequential .spawn() submits"),
        ("batch", "inputs in the batch submit"),
        ("podman-calls", "calls of each kind on the Podman executor"),
    ):
        p.add_argument(f"--{name}", type=int, default=None, metavar="N", help=help_)
    a = p.parse_args(argv)
    sizes = QUICK if a.quick else FULL
    over = {k: getattr(a, k) for k in ("baseline", "remote", "map_inputs", "spawn", "batch")}
    over["podman"] = a.podman_calls
    sizes = Sizes(**{**sizes.__dict__, **{k: v for k, v in over.items() if v is not None}})
    if min(sizes.__dict__.values()) < 1:
        p.error("every N must be at least 1")

    # Measured against the daemon's interpreter (the baselines run it): jobs use it too,
    # rather than this process's own, which a root daemon's job user may not reach (#11).
    os.environ.setdefault("GPUD_JOB_PYTHON", "daemon")

    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so the finally blocks stop the daemons.
    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    def progress(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    try:
        result = run(sizes, a.quick, progress, podman=not a.no_podman)
    except KeyboardInterrupt:
        print("[bench] interrupted; daemons stopped, temporary files removed", file=sys.stderr)
        return 130
    print(render(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        progress(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
