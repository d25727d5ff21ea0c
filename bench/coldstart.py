#!/usr/bin/env python3
"""Cold start with heavy setup: a cold container, a restored snapshot, a warm container
and a plain local process, for a class whose setup imports numpy, scipy and pandas and
computes about 300 MB of state.

    .venv/bin/python bench/coldstart.py [--quick] [--rebuild] [--json results.json]

What it measures, each as the time from the call to its result, p50 and p95:

* local baseline: the same setup and one call in a fresh `python3` subprocess on the host
  (this benchmark's interpreter, with the image's wheels installed into a cache directory
  put on PYTHONPATH): what the work costs without gpud or a container;
* cold container: snapshot off, keep_warm=0, so every call is a new container that runs
  the setup;
* restored snapshot: snapshot=True, keep_warm=0. The first call runs the setup and takes
  the snapshot (its time is reported on its own); every later call is a new container
  restored from that snapshot;
* warm container: keep_warm=60; the calls after the first run in the same container.

A call is `spawn()` then `get()` copying the job's log to stderr, which is what
`.remote()` does; the handle then tells how the job started (`start_kind`: "cold",
"restored" or "warm"). The benchmark checks that every call started the way its row
claims, and that every result equals the local run's. It exits non-zero on errors only;
a missed goal is printed as MISSED.

The image localhost/gpud-bench-coldstart:3.11 is built once (again with --rebuild, or
when bench/coldstart/ changed) FROM localhost/gpud-python:3.11 with
bench/coldstart/Containerfile: the wheels pinned in bench/coldstart/requirements.txt are
downloaded on the host (pip download, cached in ~/.cache/gpud-bench-coldstart), and the
build itself runs with --network none and never pulls. The benchmark starts its own
`gpud serve` (executor "podman", fake GPUs, a temporary data directory, its own
`podman system service`) as bench/run.py does, and removes the daemon, its containers
and its snapshots at the end. Needs root, Podman, and the base image.
"""

# numpy, scipy and pandas are in the image (and the baseline's site dir), not the venv:
# mypy: disable-error-code="import-not-found,import-untyped,untyped-decorator"
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gpud_client as gpud  # noqa: E402 - sys.path is set first
from bench.run import CORES, Daemon, latency  # noqa: E402 - sys.path is set first

HERE = Path(__file__).resolve().parent / "coldstart"
BASE_IMAGE = "localhost/gpud-python:3.11"
IMAGE = "localhost/gpud-bench-coldstart:3.11"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpud-bench-coldstart"
GOAL_COLD_OVER_RESTORED = 5.0
GOAL_RESTORED_S = 1.0
GOAL_WARM_S = 0.050
XS = 32  # calls use x = 0..31 (the reference run computes all of them)


# -- the workload: runs in the job's container, and in the local baseline ------------------


def build_state(seed: int = 0) -> dict[str, Any]:
    """About 300 MB computed from a seeded RNG (~3 s on 2 cores): dense, tabular, sparse."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    # Dense: 120k unit-norm embeddings of 128 dims (123 MB) and their whitening matrix.
    emb = rng.standard_normal((120_000, 128))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    whiten = np.linalg.cholesky(np.linalg.inv(emb.T @ emb / len(emb)))
    # Tabular: 2M rows (80 MB) and per-key aggregates.
    n = 2_000_000
    df = pd.DataFrame(
        {
            "key": rng.integers(0, 1000, n),
            "a": rng.standard_normal(n),
            "b": rng.exponential(1.0, n),
            "c": rng.uniform(-1, 1, n),
        }
    )
    df["d"] = df["a"] * df["b"] + df["c"]
    stats = df.groupby("key")[["a", "b", "d"]].agg(["mean", "std"])
    # Sparse: a 200k x 50k CSR matrix with 8M non-zeros (~100 MB).
    nnz, rows, cols = 8_000_000, 200_000, 50_000
    graph = sp.csr_matrix(
        (rng.standard_normal(nnz), (rng.integers(0, rows, nnz), rng.integers(0, cols, nnz))),
        shape=(rows, cols),
    )
    return {"emb": emb, "whiten": whiten, "df": df, "stats": stats, "graph": graph}


def state_mb(state: dict[str, Any]) -> float:
    g = state["graph"]
    return (
        float(
            state["emb"].nbytes
            + state["whiten"].nbytes
            + g.data.nbytes
            + g.indices.nbytes
            + g.indptr.nbytes
            + int(state["df"].memory_usage(index=True).sum())
            + int(state["stats"].memory_usage(index=True).sum())
        )
        / 1e6
    )


def score(state: dict[str, Any], x: int) -> float:
    """The call: a little work on the state, a small deterministic number."""
    import numpy as np

    q = state["emb"][x % len(state["emb"])] @ state["whiten"]
    row = state["graph"].getrow(x % state["graph"].shape[0])
    agg = state["stats"].iloc[x % len(state["stats"])]
    return float(np.abs(q).sum() + row.sum() + agg.sum())


class Model:
    @gpud.enter(snap=True)
    def load(self) -> None:
        self.state = build_state()

    @gpud.method()
    def predict(self, x: int) -> float:
        return score(self.state, x)


# -- the image and the host-side packages -------------------------------------------------


def sh(*cmd: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, text=True, **kw)


def prepare(rebuild: bool, progress: Any) -> dict[str, Any]:
    """The wheels (downloaded on the host), the image, and the baseline's site dir; each
    made again when bench/coldstart/ changed (the image carries a digest of it)."""
    info: dict[str, Any] = {}
    ctx, site = CACHE / "context", CACHE / "baseline-site-py{}.{}".format(*sys.version_info)
    wheels, reqs = ctx / "wheels", (HERE / "requirements.txt").read_text()
    digest = hashlib.sha256((HERE / "Containerfile").read_bytes() + reqs.encode()).hexdigest()
    if (
        rebuild
        or not (wheels / "requirements.txt").exists()
        or (wheels / "requirements.txt").read_text() != reqs
    ):
        shutil.rmtree(CACHE, ignore_errors=True)
    t0 = time.perf_counter()
    if not wheels.exists():
        progress(f"downloading the wheels of {HERE / 'requirements.txt'} into {wheels}")
        wheels.mkdir(parents=True)
        sh(
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "manylinux2014_x86_64",
            "-r",
            str(HERE / "requirements.txt"),
            "-d",
            str(wheels),
        )
        (wheels / "requirements.txt").write_text(reqs)
    old = sh(
        "podman",
        "image",
        "inspect",
        "--format",
        '{{.Id}} {{index .Labels "gpud.bench"}}',
        IMAGE,
        check=False,
        capture_output=True,
    ).stdout.split()
    label = old[1] if len(old) > 1 else ""
    if rebuild or label != digest:
        if sh("podman", "image", "exists", BASE_IMAGE, check=False).returncode != 0:
            raise RuntimeError(
                f"the base image {BASE_IMAGE} is not in the local Podman store "
                "(../shared/ci/podman-host-setup.sh --image builds it)"
            )
        progress(f"building {IMAGE} (podman build --network none)")
        sh(
            "podman",
            "build",
            "--quiet",
            "--network",
            "none",
            "--label",
            f"gpud.bench={digest}",
            *(["--no-cache"] if rebuild else []),
            "-f",
            str(HERE / "Containerfile"),
            "-t",
            IMAGE,
            str(ctx),
            stdout=subprocess.DEVNULL,
        )
        info["build_s"] = time.perf_counter() - t0  # download + build
        new = sh(
            "podman", "image", "inspect", "--format", "{{.Id}}", IMAGE, capture_output=True
        ).stdout.strip()
        if old and old[0] != new:  # the image this one replaced, untagged now
            sh("podman", "rmi", old[0], check=False, capture_output=True)
    size = sh(
        "podman", "image", "inspect", "--format", "{{.Size}}", IMAGE, capture_output=True
    ).stdout.strip()
    info["image_mb"] = int(size) / 1e6
    if not site.exists():
        progress(f"installing the same wheels into {site} for the local baseline")
        sh(
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-index",
            "--find-links",
            str(wheels),
            "--target",
            str(site),
            "-r",
            str(wheels / "requirements.txt"),
        )
    info["baseline_site"] = str(site)
    return info


# -- the local baseline ----------------------------------------------------------------------

_CHILD_MAIN = """
import json, sys
state = build_state()
xs = [int(a) for a in sys.argv[1:]]
print(json.dumps({"values": [score(state, x) for x in xs], "state_mb": state_mb(state)}))
"""


def local_run(site: str, xs: list[int]) -> dict[str, Any]:
    src = (
        "from __future__ import annotations\nfrom typing import Any\n"
        + "".join(inspect.getsource(f) for f in (build_state, state_mb, score))
        + _CHILD_MAIN
    )
    env = dict(os.environ, PYTHONPATH=site)
    out = sh(sys.executable, "-c", src, *map(str, xs), env=env, capture_output=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def check(got: float, want: float, what: str) -> None:
    if not math.isclose(got, want, rel_tol=1e-6):
        raise RuntimeError(f"{what}: result {got!r} differs from the local run's {want!r}")


def measure_baseline(site: str, n: int, ref: list[float]) -> list[float]:
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        got = local_run(site, [i % XS])["values"][0]
        samples.append(time.perf_counter() - t0)
        check(got, ref[i % XS], f"local run x={i % XS}")
    return samples


# -- gpud ------------------------------------------------------------------------------------


def call(
    model: Any, x: int, ref: list[float], want_kind: str | None, what: str, errors: list[str]
) -> tuple[float, str, float | None]:
    """One timed call: (seconds, start kind, daemon-side startup seconds)."""
    t0 = time.perf_counter()
    h = model.predict.spawn(x)
    got = h.get(timeout=600, log_to=sys.stderr)
    dt = time.perf_counter() - t0
    check(got, ref[x % XS], f"{what} x={x}")
    info = h.status()
    if want_kind is not None and info.start_kind != want_kind:
        errors.append(f"{what}: job {h.id} started {info.start_kind!r}, expected {want_kind!r}")
    return dt, str(info.start_kind), info.startup


def series(
    model: Any,
    n: int,
    first_x: int,
    ref: list[float],
    kind: str,
    what: str,
    errors: list[str],
    progress: Any,
) -> dict[str, Any]:
    samples, kinds, startups = [], [], []
    for i in range(n):
        dt, k, su = call(model, first_x + i, ref, kind, what, errors)
        samples.append(dt)
        kinds.append(k)
        if su is not None:
            startups.append(su)
        progress(f"  {what} {i + 1}/{n}: {dt * 1000:.0f} ms ({k})")
    out = latency(samples)
    out["kinds"] = sorted(set(kinds))
    if startups:
        out["startup_p50_ms"] = latency(startups)["p50_ms"]
    return out


def snapshot_rows(d: Daemon) -> list[dict[str, Any]] | None:
    """The daemon's snapshots (GET /v1/snapshots), for the report; None if unreachable."""
    try:
        with gpud.Client(d.url) as c:
            return [msgspec.structs.asdict(s) for s in c.snapshots().snapshots]
    except gpud.GpudError:
        return None


def wait_snapshot(d: Daemon, timeout: float = 300) -> dict[str, Any] | None:
    """The daemon's snapshot once no longer being taken; None if it recorded none."""
    deadline = time.monotonic() + timeout
    while True:
        rows = snapshot_rows(d) or []
        if not rows or all(r.get("state") != "taking" for r in rows):
            return rows[-1] if rows else None
        if time.monotonic() > deadline:
            raise RuntimeError(f"the snapshot was still being taken after {timeout:.0f} s")
        time.sleep(0.1)


def measure_gpud(
    sizes: dict[str, int], ref: list[float], base: Path, progress: Any
) -> tuple[dict[str, Any], list[str]]:
    m: dict[str, Any] = {}
    errors: list[str] = []
    env = {
        "GPUD_EXECUTOR": "podman",
        "GPUD_PODMAN_START_SERVICE": "1",
        "GPUD_PODMAN_URL": f"unix://{base / 'podman' / 'podman.sock'}",
        "GPUD_DEFAULT_IMAGE": BASE_IMAGE,
    }
    d = Daemon(base, "daemon", CORES, env=env)
    try:
        d.start()

        def cls(variant: str, **opts: Any) -> Any:
            return gpud.App(f"coldstart-{variant}", url=d.url).cls(image=IMAGE, **opts)(Model)

        cold = cls("cold", keep_warm=0)
        progress("cold: one untimed call first (the daemon's first use of the image)")
        m["cold_first"] = {"s": call(cold(), 0, ref, "cold", "cold", errors)[0]}
        progress(f"cold: {sizes['cold']} calls, each a new container running the setup")
        m["cold"] = series(cold(), sizes["cold"], 1, ref, "cold", "cold", errors, progress)

        try:
            snap = cls("snap", keep_warm=0, snapshot=True)
        except TypeError as e:
            m["restored_skipped"] = f"this gpud_client has no snapshot= option ({e})"
            progress(f"restored: skipped, {m['restored_skipped']}")
        else:
            progress("restored: the first call takes the snapshot")
            dt, kind, _ = call(snap(), 0, ref, None, "snapshot-taking call", errors)
            m["snapshot_first"] = {"s": dt, "kind": kind}
            row = wait_snapshot(d)
            if row is not None:
                m["snapshot"] = {k: row.get(k) for k in ("id", "state", "size", "last_error")}
                if row.get("state") == "failed":
                    errors.append(f"the snapshot failed: {row.get('last_error')}")
            progress(f"restored: {sizes['restored']} calls, each restored from the snapshot")
            m["restored"] = series(
                snap(), sizes["restored"], 1, ref, "restored", "restored", errors, progress
            )

        warm = cls("warm", keep_warm=60)
        progress("warm: the first call starts the container")
        m["warm_first"] = {"s": call(warm(), 0, ref, "cold", "warm's first call", errors)[0]}
        progress(f"warm: {sizes['warm']} calls in the same container")
        m["warm"] = series(warm(), sizes["warm"], 1, ref, "warm", "warm", errors, lambda s: None)
    finally:
        d.stop()  # also kills its jobs, removes its containers, stops its Podman service
    return m, errors


# -- report ----------------------------------------------------------------------------------


def fmt(ms: float) -> str:
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def goal(ok: bool, text: str) -> str:
    return f"{text}: ok" if ok else f"{text}: MISSED"


def render(r: dict[str, Any]) -> str:
    m, meta = r["metrics"], r["meta"]
    base = m["baseline"]["p50_ms"]
    rows = [("local process (baseline)", m["baseline"], ""), ("cold container", m["cold"], "")]
    if "restored" in m:
        ms, kind = m["snapshot_first"]["s"] * 1000, m["snapshot_first"]["kind"]
        one = {"n": 1, "p50_ms": ms, "p95_ms": ms, "kinds": [kind]}
        rows.append(("first call, taking the snapshot", one, ""))
        res, ratio = m["restored"]["p50_ms"], m["cold"]["p50_ms"] / m["restored"]["p50_ms"]
        rows.append(
            (
                "restored snapshot",
                m["restored"],
                goal(res < GOAL_RESTORED_S * 1000, f"p50 < {GOAL_RESTORED_S:.0f} s")
                + "; "
                + goal(
                    ratio >= GOAL_COLD_OVER_RESTORED,
                    f"cold/restored {ratio:.1f}x >= {GOAL_COLD_OVER_RESTORED:.0f}x",
                ),
            )
        )
    rows.append(
        (
            "warm container",
            m["warm"],
            goal(m["warm"]["p50_ms"] < GOAL_WARM_S * 1000, f"p50 < {GOAL_WARM_S * 1000:.0f} ms"),
        )
    )
    out = [
        f"gpud cold start, {meta['cores']} cores, {'quick' if meta['quick'] else 'full'} "
        f"run, {meta['elapsed_s']:.0f} s; image {IMAGE} ({meta['image_mb']:.0f} MB"
        + (f", built in {meta['build_s']:.0f} s" if "build_s" in meta else "")
        + ")",
        f"setup: import numpy, scipy, pandas; compute {meta['state_mb']:.0f} MB of state; "
        "call: a small float, checked against the local run's",
        f"baseline: {sys.executable} in a subprocess, PYTHONPATH={meta['baseline_site']}",
        "",
        "| start | n | p50 | p95 | p50 / local | job's start kind | goal |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for label, v, g in rows:
        out.append(
            f"| {label} | {v['n']} | {fmt(v['p50_ms'])} | {fmt(v['p95_ms'])} | "
            f"{v['p50_ms'] / base:.2f}x | {', '.join(v.get('kinds', ['-']))} | {g} |"
        )
    out.append("")
    if "restored_skipped" in m:
        out.append(f"restored snapshot: not measured: {m['restored_skipped']}")
    if "snapshot" in m:
        s = m["snapshot"]
        out.append(f"snapshot: {s['state']}, {(s['size'] or 0) / 1e6:.0f} MB, snapshot {s['id']}")
    out.append(
        f"untimed first calls: cold {m['cold_first']['s']:.2f} s (the image's first use),"
        f" warm's first {m['warm_first']['s']:.2f} s"
    )
    su = [
        f"{k} {fmt(m[k]['startup_p50_ms'])}"
        for k in ("cold", "restored", "warm")
        if k in m and "startup_p50_ms" in m[k]
    ]
    if su:
        out.append(
            "daemon-side startup p50 (dispatch to first line of user code): " + ", ".join(su)
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer calls: 2 each, 5 warm")
    p.add_argument(
        "--rebuild", action="store_true", help="download the wheels and build the image again"
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    a = p.parse_args(argv)
    sizes = (
        dict(baseline=2, cold=2, restored=2, warm=5)
        if a.quick
        else dict(baseline=5, cold=5, restored=5, warm=20)
    )
    if os.geteuid() != 0 or shutil.which("podman") is None:
        print("bench/coldstart.py needs root and rootful Podman", file=sys.stderr)
        return 2

    def progress(msg: str) -> None:
        print(f"[coldstart] {msg}", file=sys.stderr, flush=True)

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="gpud-coldstart-", dir="/tmp"))
    os.chmod(base, 0o755)  # the daemon runs root's jobs as nobody
    try:
        meta: dict[str, Any] = {
            "quick": a.quick,
            "cores": CORES,
            "sizes": sizes,
            **prepare(a.rebuild, progress),
        }
        progress("local reference run (untimed; also warms the page cache)")
        ref_run = local_run(meta["baseline_site"], list(range(XS)))
        ref, meta["state_mb"] = ref_run["values"], ref_run["state_mb"]
        progress(f"local baseline: {sizes['baseline']} processes")
        metrics: dict[str, Any] = {
            "baseline": latency(measure_baseline(meta["baseline_site"], sizes["baseline"], ref))
        }
        gm, errors = measure_gpud(sizes, ref, base, progress)
        metrics.update(gm)
    except KeyboardInterrupt:
        progress("interrupted; daemon stopped, temporary files removed")
        return 130
    except (RuntimeError, subprocess.CalledProcessError, gpud.GpudError) as e:
        progress(f"error: {e}")
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    meta["elapsed_s"] = time.perf_counter() - started
    result = {"meta": meta, "metrics": metrics, "errors": errors}
    print(render(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
