#!/usr/bin/env python3
"""gpud's chaos suite: kill -9 a real `gpud serve` at random moments under a mixed load,
restart it, and check that no acknowledged job is lost, stuck, run twice or marked lost
after it finished.

    .venv/bin/python bench/chaos.py --rounds 100 --report chaos.json
    .venv/bin/python bench/chaos.py --rounds 10 --executor podman

Each round: three client threads submit single jobs, batches, cancels, jobs that time
out, failing jobs (retried), GPU and CPU jobs and warm-worker jobs (keep_warm); one
extra fault may hit (a job's worker killed, a second process holding the SQLite write
lock, the data directory's small tmpfs filled up; in Podman mode a job's container or
its conmon killed); then the daemon gets SIGKILL, stays down a random moment, and is
restarted. Once every acknowledged job is final (or the bound passes) the round's jobs
are checked (see bench/chaos_checks.py), and `gpud ps --json` is compared with the API.
It prints a summary and writes the JSON report; exit status 1 when a violation was seen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(Path(__file__).resolve().parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import chaos_checks as checks  # noqa: E402 - sys.path is set first
from chaos_checks import Acked, Kill, Tally  # noqa: E402 - sys.path is set first
from run import podman_problem  # noqa: E402  (bench/run.py)

import gpud_client as gpud  # noqa: E402 - sys.path is set first
from gpud.testing.daemon_proc import DaemonProc  # noqa: E402 - sys.path is set first
from gpud_client import GpudError  # noqa: E402 - sys.path is set first
from gpud_client.client import Client  # noqa: E402 - sys.path is set first

FAULTS = ("none", "worker", "sqlite_lock", "disk_full")
PODMAN_FAULTS = ("container", "conmon")


# -- the job every load submits -------------------------------------------------------------


def chaos_job(marks: str, tag: str, seconds: float, fail: bool = False, state: bool = False) -> str:
    """Append start/done marks (outside the data dir) and hold the job's flock while the
    user code runs: a second attempt running at the same time finds it held.

    ``state``: also append the attempt's number to ``attempts`` in the job's state dir
    (kept across its attempts and the daemon's restarts: the checks compare it with the
    start marks), and mark the signal_before warning (SIGUSR1) when it comes."""
    import fcntl
    import os
    import signal
    import socket
    import time

    jid, att = os.environ.get("GPUD_JOB_ID", "0"), os.environ.get("GPUD_ATTEMPT", "0")
    path = os.path.join(marks, f"{jid}.log")

    def mark(what: str) -> None:
        line = f"{what} {jid} {att} {os.getpid()} {socket.gethostname()} {time.time():.6f}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    lock = os.open(os.path.join(marks, f"{jid}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            mark("concurrent")
        mark("start")
        if state:
            d = os.environ["GPUD_STATE_DIR"]
            fd = os.open(os.path.join(d, "attempts"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, f"{att}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            signal.signal(signal.SIGUSR1, lambda *_: mark("warned"))
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))  # a signal's handler runs between the naps
        if fail:
            mark("fail")
            raise RuntimeError("chaos: failing on purpose")
        mark("done")
        return tag
    finally:
        os.close(lock)


# -- the daemon -----------------------------------------------------------------------------


#: The chaos run's daemon settings: fake GPUs, six CPU slots, fast retries.
CHAOS_SETTINGS = {
    "GPUD_GPUS": "fake",
    "GPUD_FAKE_GPUS": "h100,h100,l4",
    "GPUD_CPU_SLOTS": "6",
    "GPUD_KILL_GRACE": "1",
    "GPUD_RETRY_BACKOFF": "0.2",
    "GPUD_LOG_LEVEL": "info",
    "GPUD_GPU_POLL_INTERVAL": "0.5",
    # Queued high-priority GPU jobs suspend running ones after a second (#13): the
    # "preempt" load's jobs do, and the suspended ones resume when the GPUs free up.
    "GPUD_PREEMPT_AFTER": "1s",
}


class Daemon(DaemonProc):
    """The daemon under chaos (gpud.testing.daemon_proc), in a session of its own; its data
    directory may be on a small tmpfs. Stopping it also ends its jobs and containers."""

    def __init__(self, base: Path, data_dir: Path, env: dict[str, str]) -> None:
        super().__init__(
            base, env=env, settings=CHAOS_SETTINGS, data_dir=data_dir, own_session=True
        )

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        super().stop(sig, grace)
        self.kill_jobs()
        if self.executor == "podman":
            self.remove_containers()


# -- the load -------------------------------------------------------------------------------


class Load:
    """Client threads submitting a mix of jobs until stopped; acknowledged ids recorded."""

    KINDS = (
        ("cpu", 4),
        ("gpu", 2),
        ("batch", 2),
        ("cancel", 1),
        ("timeout", 1),
        ("warm", 2),
        ("fail", 1),
        # the features of #13/#14 under kill -9: dependencies, suspend/resume (by the
        # API, and by preemption), state dirs with signal_before
        ("after", 2),
        ("suspend", 2),
        ("preempt", 1),
        ("state", 1),
    )

    def __init__(
        self,
        url: str,
        marks: Path,
        rnd: random.Random,
        round_no: int,
        tally: Tally,
        threads: int = 3,
    ) -> None:
        self.url, self.marks, self.rnd, self.round = url, str(marks), rnd, round_no
        self.tally = tally
        self.acked: list[Acked] = []
        #: jobs this load suspended and did not resume: a calm round (no restart to resume
        #: them) resumes them itself, else they would wait for ever and count as stuck
        self.left_suspended: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.seq = 0
        self.threads = [
            threading.Thread(target=self._loop, args=(random.Random(rnd.random()),), daemon=True)
            for _ in range(threads)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _name(self) -> str:
        with self.lock:
            self.seq += 1
            return f"chaos.r{self.round}.{self.seq}"

    def _ack(self, ids: list[int], kind: str, name: str, after: tuple[int, ...] = ()) -> None:
        with self.lock:
            self.acked.extend(Acked(i, kind, self.round, name, after) for i in ids)

    def _api_call(self, what: str, fn: Any, *args: Any) -> Any:
        """A suspend or resume: refused (409: the job is no longer running, or not
        suspended) or cut off by the kill -9, it is counted, never a violation."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - the daemon may be down: counted
            key = f"{what}: " + (
                f"ApiError {e.status}" if isinstance(e, gpud.ApiError) else type(e).__name__
            )
            with self.lock:
                self.tally.feature_calls[key] += 1
            return None

    def _error(self, e: BaseException) -> None:
        with self.lock:
            self.tally.unacknowledged_submits += 1
            key = type(e).__name__
            if isinstance(e, gpud.ApiError):
                key = f"ApiError {e.status} {e.code}"
            self.tally.client_errors[key] += 1

    def _loop(self, rnd: random.Random) -> None:
        app = gpud.App("chaos", url=self.url)
        base = app.function()(chaos_job)
        kinds = [k for k, w in self.KINDS for _ in range(w)]
        try:
            while not self.stop.is_set():
                kind = rnd.choice(kinds)
                try:
                    self._one(rnd, base, kind)
                except GpudError as e:
                    self._error(e)
                    self.stop.wait(0.05)
                except Exception as e:  # noqa: BLE001 - an httpx or decode error: report it
                    self._error(e)
                    self.stop.wait(0.05)
                self.stop.wait(rnd.uniform(0.0, 0.15))
        finally:
            app.close()

    def _one(self, rnd: random.Random, base: Any, kind: str) -> None:
        name = self._name()
        secs = rnd.uniform(0.05, 1.2)
        retries = rnd.choice((0, 1, 2))
        if kind == "batch":
            fn = base.with_options(name=name, retries=retries)
            n = rnd.randint(2, 6)
            req = fn.batch_request(
                [((self.marks, name, rnd.uniform(0.05, 0.8)), {}) for _ in range(n)]
            )
            resp = fn.client.submit_batch(req)
            self._ack(list(resp.job_ids), kind, name)
            return
        opts: dict[str, Any] = {"name": name, "retries": retries}
        args: tuple[Any, ...] = (self.marks, name, secs)
        if kind == "gpu":
            opts["gpu"] = rnd.choice(("h100", "l4"))
        elif kind == "cancel":
            args = (self.marks, name, 5.0)
        elif kind == "timeout":
            opts["timeout"] = 1.0
            args = (self.marks, name, 3.0)
        elif kind == "warm":
            opts["keep_warm"] = 3.0
        elif kind == "fail":
            opts["retries"] = 1
            args = (self.marks, name, secs, True)
        elif kind == "after":
            self._chain(rnd, base, name, retries)
            return
        elif kind in ("suspend", "preempt"):
            opts["gpu"] = "h100" if kind == "preempt" else rnd.choice(("h100", "l4", None))
            args = (self.marks, name, rnd.uniform(0.8, 1.8))
            if kind == "preempt":
                opts["priority"] = 10
                args = (self.marks, name, rnd.uniform(0.3, 1.0))
        elif kind == "state":
            # Sometimes past its timeout, warned before it (signal_before), sometimes not.
            opts["timeout"] = 2.0
            opts["signal_before"] = 1.0
            args = (self.marks, name, rnd.choice((secs, 3.0)), False, True)
        fn = base.with_options(**opts)
        handle = fn.spawn(*args)
        self._ack([handle.id], kind, name)
        if kind == "suspend":
            self._suspend_resume(rnd, handle)
        if kind == "warm":
            # Calls in a row, each once the previous ended: the next one can run in the
            # warm worker the previous left (a lone call would always start cold).
            for _ in range(rnd.randint(1, 3)):
                if self.stop.is_set() or not _wait_final(handle, 4.0):
                    break
                handle = fn.spawn(self.marks, name, rnd.uniform(0.05, 0.5))
                self._ack([handle.id], kind, name)
        if kind == "cancel":
            self.stop.wait(rnd.uniform(0.0, 0.8))
            handle.cancel()

    def _chain(self, rnd: random.Random, base: Any, name: str, retries: int) -> None:
        """Two or three jobs, each after the one before (``after=``); the first fails
        now and then, which must cancel the rest and run none of them."""
        first = base.with_options(name=name, retries=retries).spawn(
            self.marks, name, rnd.uniform(0.1, 1.0), rnd.random() < 0.25
        )
        self._ack([first.id], "after", name)
        prev = first.id
        for i in range(rnd.randint(1, 2)):
            sub = f"{name}.{i + 1}"
            h = base.with_options(name=sub, retries=retries).spawn(
                self.marks, sub, rnd.uniform(0.05, 0.5), after=[prev]
            )
            self._ack([h.id], "after", sub, (prev,))
            prev = h.id

    def _suspend_resume(self, rnd: random.Random, handle: Any) -> None:
        """Suspend the job once it runs, resume it a moment later (the kill -9 may fall
        anywhere in between: the restart resumes it then)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if self.stop.is_set():
                return
            info = self._api_call("status", handle.status)
            if info is None or info.state in checks.FINAL:
                return
            if info.state == "running":
                break
            self.stop.wait(0.05)
        # No call once the round's load is over (the daemon may be down, and a call would
        # retry until it is back): a job left suspended is resumed by the restart.
        if self.stop.wait(rnd.uniform(0.0, 0.4)):
            return
        if self._api_call("suspend", handle.client.suspend, handle.id) is None:
            return
        with self.lock:
            self.tally.feature_calls["suspend: ok"] += 1
            self.left_suspended.add(handle.id)
        if self.stop.wait(rnd.uniform(0.1, 1.0)):
            return
        if self._api_call("resume", handle.client.resume, handle.id) is not None:
            with self.lock:
                self.tally.feature_calls["resume: ok"] += 1
                self.left_suspended.discard(handle.id)


def _wait_final(handle: Any, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if handle.status().state in checks.FINAL:
            return True
        time.sleep(0.05)
    return False


# -- faults ---------------------------------------------------------------------------------


def running_attempts(marks: Path, ids: list[int]) -> list[checks.Mark]:
    out = []
    for jid in ids:
        ms = checks.read_marks(marks, jid)
        ended = {(m.attempt) for m in ms if m.what in ("done", "fail")}
        out.extend(m for m in ms if m.what == "start" and m.attempt not in ended)
    return out


def kill_worker(rnd: random.Random, marks: Path, ids: list[int], kills: list[Kill]) -> str:
    """SIGKILL the process running one job attempt's user code (a cold or warm worker)."""
    running = running_attempts(marks, ids)
    if not running:
        return "no running job"
    m = rnd.choice(running)
    kills.append(Kill(time.time(), pid=m.pid))
    with contextlib.suppress(OSError):
        os.kill(m.pid, signal.SIGKILL)
    return f"job {m.job} attempt {m.attempt} pid {m.pid}"


def kill_container(
    rnd: random.Random, instance: str | None, kills: list[Kill], conmon: bool
) -> str:
    """SIGKILL a container of this daemon (a job's or a warm worker's), or its conmon."""
    if instance is None:
        return "no instance"
    ids = subprocess.run(
        ["podman", "ps", "-q", "--no-trunc", "--filter", f"label=gpud.daemon={instance}"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.split()
    if not ids:
        return "no container"
    cid = rnd.choice(ids)
    kills.append(Kill(time.time(), host=cid[:12]))
    if conmon:
        pid = subprocess.run(
            ["podman", "inspect", "--format", "{{.State.ConmonPid}}", cid],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if pid.isdigit():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
        return f"conmon {pid} of {cid[:12]}"
    subprocess.run(["podman", "kill", "--signal", "KILL", cid], capture_output=True, timeout=30)
    return f"container {cid[:12]}"


def hold_sqlite_lock(db: Path, seconds: float) -> subprocess.Popen[bytes]:
    """A second process that takes the ledger's write lock (BEGIN IMMEDIATE) for a while."""
    code = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "time.sleep(float(sys.argv[2]))\n"
        "c.execute('ROLLBACK')\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(db), str(seconds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def fill_disk(fs: Path) -> Path | None:
    """Fill the data directory's tmpfs to the last block; the caller removes the file."""
    filler = fs / "filler"
    st = os.statvfs(fs)
    try:
        with open(filler, "wb") as fh:
            os.posix_fallocate(fh.fileno(), 0, st.f_bavail * st.f_frsize)
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
    except OSError:
        pass
    return filler


# -- one round ------------------------------------------------------------------------------


def ps_json(url: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "gpud", "ps", "--all", "--json", "--limit", "1000", "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
    )
    if out.returncode != 0:
        raise RuntimeError(f"gpud ps failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def drain(client: Client, acked: list[Acked], bound: float) -> tuple[dict[int, Any], list[int]]:
    """Wait until every acked job is final; return their JobInfo, and those not final."""
    infos: dict[int, Any] = {}
    pending = {a.id for a in acked}
    deadline = time.monotonic() + bound
    lost: list[int] = []
    while pending and time.monotonic() < deadline:
        for jid in sorted(pending):
            try:
                info = client.get_job(jid)
            except gpud.ApiError as e:
                if e.status == 404:
                    lost.append(jid)
                    pending.discard(jid)
                    continue
                raise
            if info.state in checks.FINAL:
                infos[jid] = info
                pending.discard(jid)
        if pending:
            time.sleep(0.2)
    return infos, sorted(pending) + [-j for j in lost]


def job_events(client: Client, job_id: int) -> list[Any]:
    out: list[Any] = []
    after = 0
    while True:
        page = client.events(after, limit=1000, job_id=job_id)
        out.extend(page.events)
        if len(page.events) < 1000:
            return out
        after = page.cursor


def state_attempts(client: Client, job_id: int) -> list[int] | None:
    """The attempt numbers the job wrote to its state dir (None: no such file)."""
    try:
        text = b"".join(client.state_file(job_id, "attempts")).decode()
    except GpudError:
        return None
    return [int(x) for x in text.split()]


def run_round(
    r: int,
    args: argparse.Namespace,
    rnd: random.Random,
    d: Daemon,
    t: Tally,
    marks: Path,
    fs: Path | None,
    kills: list[Kill],
) -> None:
    t0 = time.monotonic()
    load = Load(d.url, marks, rnd, r, t)
    load.start()
    time.sleep(rnd.uniform(0.3, 1.5))
    faults = list(args.faults or (FAULTS + (PODMAN_FAULTS if args.executor == "podman" else ())))
    if fs is None and "disk_full" in faults:
        faults.remove("disk_full")
    fault = rnd.choice(faults)
    t.faults[fault] += 1
    holder: subprocess.Popen[bytes] | None = None
    filler: Path | None = None
    fill_at = 0.0
    detail = ""
    if fault == "worker":
        detail = kill_worker(rnd, marks, [a.id for a in load.acked], kills)
    elif fault in PODMAN_FAULTS:
        detail = kill_container(rnd, d.instance(), kills, conmon=fault == "conmon")
    elif fault == "sqlite_lock":
        hold = rnd.uniform(0.5, args.lock_seconds)
        holder = hold_sqlite_lock(d.data_dir / "ledger.db", hold)
        detail = f"{hold:.1f} s"
    elif fault == "disk_full" and fs is not None:
        fill_at = time.time()
        filler = fill_disk(fs)
    t.fault_log.append(f"round {r}: {fault} {detail}".rstrip())
    time.sleep(rnd.uniform(0.1, 1.5))
    if (code := d.exited()) is not None:
        t.daemon_exits.append(f"round {r}: the daemon exited by itself with {code}")
    # A calm round keeps the daemon up: the faults alone must not leave a job stuck.
    calm = rnd.random() < args.calm and code is None
    if calm:
        t.faults["calm_round"] += 1
    else:
        d.kill9()
        t.faults["daemon_kill9"] += 1
    load.finish()
    if filler is not None:
        time.sleep(rnd.uniform(0.0, 0.5))
        filler.unlink(missing_ok=True)
        kills.append(Kill(fill_at, until=time.time()))
    if holder is not None:
        holder.wait()
    if not calm:
        time.sleep(rnd.uniform(0.0, 1.5))  # down: some jobs end while no daemon watches
        d.start()
    with Client(d.url) as client:
        if calm:
            # What a restart would have resumed (a suspension is the user's to end).
            for jid in sorted(load.left_suspended):
                with contextlib.suppress(GpudError):
                    client.resume(jid)
        infos, not_final = drain(client, load.acked, args.bound)
        for jid in not_final:
            if jid < 0:
                t.lost.append(-jid)
                t.note(f"round {r}: acknowledged job {-jid} unknown to the daemon")
            else:
                t.stuck.append(jid)
                t.note(
                    f"round {r}: job {jid} not final {args.bound:.0f} s after the "
                    + ("round's load (calm round)" if calm else "restart")
                )
                with contextlib.suppress(GpudError):
                    client.cancel(jid)
        for a in load.acked:
            if a.id not in infos:
                continue
            info = infos[a.id]
            result = None
            if info.state == "succeeded":
                import cloudpickle  # type: ignore[import-untyped]  # ships no hints

                with contextlib.suppress(GpudError):
                    out = cloudpickle.loads(client.result(a.id))
                    result = out.get("value") if isinstance(out, dict) else out
            events = job_events(client, a.id)
            job_marks = checks.read_marks(marks, a.id)
            checks.check_job(t, a, info, events, job_marks, kills, result)
            checks.check_suspensions(t, a, events)
            if a.kind == "state":
                checks.check_state_dir(t, a, info, job_marks, state_attempts(client, a.id), kills)
        checks.check_dependencies(t, load.acked, infos, lambda j: checks.read_marks(marks, j))
        t.jobs += len(load.acked)
        # Jobs the daemon holds under this round's names that the client never got: a
        # submit whose answer was lost went in anyway.
        names = {a.name for a in load.acked}
        acked_ids = {a.id for a in load.acked}
        api = client.list_jobs(limit=1000).jobs
        for j in api:
            if j.name.startswith(f"chaos.r{r}.") and j.id not in acked_ids:
                t.phantom_jobs.append(j.id)
                t.note(
                    f"round {r}: job {j.id} ({j.name}) committed but never acknowledged"
                    + (" (its name was acknowledged for other ids)" if j.name in names else "")
                )
        # With every job final nothing moves: the CLI must show what the API shows.
        cli = {j["id"]: j["state"] for j in ps_json(d.url)}
        api_states = {j.id: j.state for j in client.list_jobs(limit=1000).jobs}
        # A job that is not final in one of the two reads (one the harness started
        # itself, outside this round's acknowledged load) may move between them; only a
        # disagreement about settled jobs is one.
        diff = {
            k: (cli.get(k), api_states.get(k))
            for k in set(cli) | set(api_states)
            if cli.get(k) != api_states.get(k)
            and cli.get(k) in checks.FINAL
            and api_states.get(k) in checks.FINAL
        }
        if diff:
            t.ps_disagreements.append(f"round {r}: {dict(list(diff.items())[:5])}")
    checks.scan_log(t, d.new_log())
    t.rounds += 1
    t.round_seconds.append(time.monotonic() - t0)


# -- set-up and the run ---------------------------------------------------------------------


def mount_tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True)
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    return out.returncode == 0


def main(argv: list[str] | None = None) -> int:
    # The jobs run with the daemon's interpreter, as bench/run.py's do: a root daemon's job
    # user may not reach this process's own (a venv under a 0700 /root, #11).
    os.environ.setdefault("GPUD_JOB_PYTHON", "daemon")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=1800.0,
        help="start no round after this many seconds (the run stays bounded)",
    )
    ap.add_argument(
        "--min-rounds",
        type=int,
        default=1,
        help="rounds run whatever --max-seconds says (a slow machine still tests a restart "
        "after a restart)",
    )
    ap.add_argument(
        "--bound",
        type=float,
        default=45.0,
        help="seconds after a restart for every job to be final, else stuck",
    )
    ap.add_argument("--executor", choices=("process", "podman"), default="process")
    ap.add_argument(
        "--calm",
        type=float,
        default=0.2,
        help="the share of rounds without the kill -9 (faults alone)",
    )
    ap.add_argument(
        "--lock-seconds",
        type=float,
        default=3.0,
        help="the longest the second process holds the SQLite write lock (the "
        "daemon's busy timeout is 10 s)",
    )
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument(
        "--no-disk",
        action="store_true",
        help="no tmpfs data directory, so no disk-full fault (also when not root)",
    )
    ap.add_argument(
        "--faults",
        type=lambda v: v.split(","),
        default=None,
        help="the extra faults to draw from, comma-separated (default: all of "
        f"{','.join(FAULTS + PODMAN_FAULTS)} that apply)",
    )
    ap.add_argument("--tmpfs-mb", type=int, default=256)
    ap.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rnd = random.Random(seed)
    if args.executor == "podman" and (why := podman_problem()) is not None:
        print(f"chaos: cannot use the Podman executor: {why}", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="gpud-chaos-", dir="/tmp"))
    os.chmod(base, 0o755)
    marks = base / "marks"
    marks.mkdir()
    os.chmod(marks, 0o1777)
    fs: Path | None = None
    if not args.no_disk and os.geteuid() == 0 and mount_tmpfs(base / "fs", args.tmpfs_mb):
        fs = base / "fs"
    data_dir = (fs or base) / "data"
    env: dict[str, str] = {}
    if args.executor == "podman":
        (base / "podman").mkdir()
        env = {
            "GPUD_EXECUTOR": "podman",
            "GPUD_PODMAN_START_SERVICE": "1",
            "GPUD_PODMAN_URL": f"unix://{base / 'podman' / 'podman.sock'}",
            "GPUD_PODMAN_VOLUMES": f"{marks}:{marks}",
        }
    d = Daemon(base, data_dir, env)
    t = Tally()
    kills: list[Kill] = []
    meta: dict[str, Any] = {
        "executor": args.executor,
        "seed": seed,
        "disk_fault": fs is not None,
        "rounds_asked": args.rounds,
        "python": sys.version.split()[0],
        "cores": os.cpu_count(),
    }
    started = time.monotonic()
    error: str | None = None
    try:
        d.start()
        for r in range(args.rounds):
            if r >= args.min_rounds and time.monotonic() - started > args.max_seconds:
                meta["stopped_early"] = f"--max-seconds {args.max_seconds:.0f} reached"
                break
            run_round(r, args, rnd, d, t, marks, fs, kills)
            v = t.violations()
            print(
                f"round {r + 1}/{args.rounds}: {t.jobs} jobs, "
                + ", ".join(f"{k} {n}" for k, n in v.items() if n),
                file=sys.stderr,
            )
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as e:  # noqa: BLE001 - reported, with what was measured so far
        import traceback

        error = traceback.format_exc()
        print(f"chaos: the run stopped: {e}", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            checks.scan_log(t, d.new_log())
        d.stop()
        if os.environ.get("GPUD_CHAOS_KEEP"):  # to look into a failure: unmount it after
            print(f"chaos: kept {base}" + (f" (umount {fs})" if fs else ""), file=sys.stderr)
        else:
            if fs is not None:
                subprocess.run(["umount", "-l", str(fs)], capture_output=True)
            shutil.rmtree(base, ignore_errors=True)
    meta["seconds"] = time.monotonic() - started
    if error is None and t.jobs == 0:
        error = "no submit was acknowledged: the run tested nothing (see the client errors)"
    meta["error"] = error
    print(checks.summary(t, meta))
    if args.report is not None:
        args.report.write_text(json.dumps(checks.as_json(t, meta), indent=2) + "\n")
    return 1 if error or any(t.violations().values()) else 0


if __name__ == "__main__":
    sys.exit(main())
