"""The chaos suite's bookkeeping and checks (bench/chaos.py drives the rounds).

What counts, per acknowledged job (the client got its id back):

* **lost**: the daemon no longer knows the job (404), or it never reached a final state
  although its attempts' code is long over;
* **stuck**: not final within the bound after the daemon's restart;
* **final states**: the ledger's event log must show exactly one final state that was
  not taken back by a retry edge (FAILED/LOST -> QUEUED in the same transaction);
* **run twice**: the job's user code ran again after an attempt of it completed (wrote
  its ``done`` mark) in a worker the harness did not kill, or two attempts ran at once
  (an attempt found the job's flock held), or two ``done`` marks for one job;
* **finished marked lost**: an attempt completed (``done`` mark, then the worker wrote
  its result, since the harness did not kill it) and the ledger still recorded the job
  as LOST after that moment;
* **retries of lost jobs** (legitimate, counted apart): LOST -> QUEUED edges; re-runs
  after the harness killed a worker right after its ``done`` mark are counted apart too
  (the result may never have been written).

Marks are what the jobs themselves append to ``<marks>/<job id>.log``, outside the data
directory, one line per event: ``what job attempt pid host time``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FINAL = {"succeeded", "failed", "cancelled", "timed_out", "lost"}
#: a log line's level: first (gpud's format, "ERROR gpud: ..."), or after a timestamp
_LEVEL = re.compile(r"^(?:[\d:,.T-]+ )*(ERROR|CRITICAL) ")


@dataclass
class Mark:
    what: str  # start, done, fail, concurrent
    job: int
    attempt: int
    pid: int
    host: str
    at: float


def read_marks(marks_dir: Path, job_id: int) -> list[Mark]:
    try:
        text = (marks_dir / f"{job_id}.log").read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 6:
            continue  # a line torn by a kill mid-write: the job's own record is partial
        out.append(
            Mark(parts[0], int(parts[1]), int(parts[2]), int(parts[3]), parts[4], float(parts[5]))
        )
    return out


@dataclass
class Acked:
    """A job the client got an id for."""

    id: int
    kind: str
    round: int
    name: str
    #: the jobs it was submitted ``after=`` (#14)
    after: tuple[int, ...] = ()


@dataclass
class Kill:
    """A worker the harness killed: by pid (process executor) or container (Podman)."""

    at: float
    pid: int | None = None
    host: str | None = None  # a container's hostname: its short id
    #: a disk-full window [at, until]: any worker finishing then may not have been able
    #: to write its result, so what follows its done mark is no violation
    until: float | None = None


@dataclass
class Tally:
    rounds: int = 0
    jobs: int = 0
    lost: list[int] = field(default_factory=list)
    stuck: list[int] = field(default_factory=list)
    run_twice: list[int] = field(default_factory=list)
    finished_marked_lost: list[int] = field(default_factory=list)
    #: of those, the ones the ledger had as STARTING when it marked them lost: the known
    #: recovery defect (#10 item 2), told apart so that a fix can be seen to remove them
    lost_while_starting: list[int] = field(default_factory=list)
    not_one_final_state: list[int] = field(default_factory=list)
    succeeded_without_running: list[int] = field(default_factory=list)
    wrong_result: list[int] = field(default_factory=list)
    ps_disagreements: list[str] = field(default_factory=list)
    phantom_jobs: list[int] = field(default_factory=list)  # committed, but not acked
    retries_of_lost: int = 0
    reruns_after_killed_done: int = 0
    final_states: Counter[str] = field(default_factory=Counter)
    start_kinds: Counter[str] = field(default_factory=Counter)  # of the succeeded jobs
    unacknowledged_submits: int = 0
    client_errors: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[str] = field(default_factory=list)
    log_errors: Counter[str] = field(default_factory=Counter)
    tracebacks: int = 0
    daemon_exits: list[str] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    #: a dependent that ran before its dependency succeeded, ran although a dependency
    #: did not succeed, or was cancelled although every dependency succeeded (#14)
    dependency_order: list[int] = field(default_factory=list)
    #: a suspension not followed by exactly one resume or end (#13)
    suspension_not_ended_once: list[int] = field(default_factory=list)
    #: a job whose state dir lost what an attempt wrote to it, or has what none wrote
    state_dir_lost: list[int] = field(default_factory=list)
    #: suspend/resume calls by the load (ok, refused, cut off), and what came of them
    feature_calls: Counter[str] = field(default_factory=Counter)
    features: Counter[str] = field(default_factory=Counter)

    def violations(self) -> dict[str, int]:
        return {
            "lost": len(self.lost),
            "stuck": len(self.stuck),
            "run_twice": len(self.run_twice),
            "finished_marked_lost": len(self.finished_marked_lost),
            "not_one_final_state": len(self.not_one_final_state),
            "succeeded_without_running": len(self.succeeded_without_running),
            "wrong_result": len(self.wrong_result),
            "ps_disagreements": len(self.ps_disagreements),
            "daemon_exits": len(self.daemon_exits),
            "dependency_order": len(self.dependency_order),
            "suspension_not_ended_once": len(self.suspension_not_ended_once),
            "state_dir_lost": len(self.state_dir_lost),
        }

    def note(self, text: str) -> None:
        if len(self.examples) < 60:
            self.examples.append(text)


def _killed(m: Mark, kills: list[Kill]) -> bool:
    """Was the worker that wrote ``m`` killed by the harness after it wrote ``m``, or did
    it finish while the disk was full?"""
    for k in kills:
        if k.until is not None:
            if k.at - 0.05 <= m.at <= k.until + 0.5:
                return True
            continue
        if k.at + 0.05 < m.at:
            continue
        if k.pid is not None and k.pid == m.pid:
            return True
        if k.host is not None and m.host.startswith(k.host[:12]):
            return True
    return False


def check_job(
    t: Tally,
    job: Acked,
    info: Any,
    events: list[Any],
    marks: list[Mark],
    kills: list[Kill],
    result: Any,
) -> None:
    """Check one acknowledged job once it is final (``info``: its JobInfo)."""
    jid = job.id
    t.final_states[info.state] += 1
    if info.state == "succeeded":
        t.start_kinds[getattr(info, "start_kind", None) or "none"] += 1
    finals = sum(1 for e in events if e.to_state in FINAL)
    retried = sum(
        1 for e in events if e.from_state in ("failed", "lost") and e.to_state == "queued"
    )
    t.retries_of_lost += sum(1 for e in events if e.from_state == "lost" and e.to_state == "queued")
    if finals - retried != 1 or not events or events[-1].to_state != info.state:
        t.not_one_final_state.append(jid)
        t.note(
            f"job {jid} ({job.kind}): {finals} final states, {retried} retries, "
            f"last event {events[-1].to_state if events else None}, state {info.state}"
        )
    done = [m for m in marks if m.what == "done"]
    clean_done = [m for m in done if not _killed(m, kills)]
    starts = [m for m in marks if m.what == "start"]
    # Two completions are a violation only when the first was a clean one (its worker
    # lived on to write the result): a re-run after a worker killed just after its done
    # mark is a legitimate retry, counted apart.
    twice = any(m.what == "concurrent" for m in marks)
    killed_done = [m for m in done if m not in clean_done]
    if any(s.at > k.at for k in killed_done for s in starts):
        t.reruns_after_killed_done += 1
    if clean_done:
        first = min(m.at for m in clean_done)
        if any(s.at > first for s in starts):
            twice = True
        lost_after = [e for e in events if e.to_state == "lost" and e.at > first]
        if lost_after:
            t.finished_marked_lost.append(jid)
            if lost_after[0].from_state == "starting":
                t.lost_while_starting.append(jid)
            t.note(
                f"job {jid} ({job.kind}): attempt {clean_done[0].attempt} completed at "
                f"{first:.3f}, then marked lost at {lost_after[0].at:.3f} "
                f"({lost_after[0].reason}); now {info.state}"
            )
    if twice:
        t.run_twice.append(jid)
        t.note(
            f"job {jid} ({job.kind}) ran twice: "
            + "; ".join(f"{m.what}#{m.attempt}@{m.at:.3f}" for m in marks)
        )
    if info.state == "succeeded":
        if not done:
            t.succeeded_without_running.append(jid)
            t.note(f"job {jid} ({job.kind}) succeeded with no completed attempt in its marks")
        elif result != job.name:
            t.wrong_result.append(jid)
            t.note(f"job {jid} ({job.kind}): result {result!r}, expected {job.name!r}")


def check_suspensions(t: Tally, job: Acked, events: list[Any]) -> None:
    """Every SUSPENDED in the job's events is followed by exactly one move out of it: a
    resume (RUNNING) or the job's end, never nothing (the job left suspended)."""
    n = 0
    for i, e in enumerate(events):
        if e.to_state != "suspended":
            continue
        n += 1
        nxt = events[i + 1] if i + 1 < len(events) else None
        if nxt is None or nxt.from_state != "suspended" or nxt.to_state == "suspended":
            t.suspension_not_ended_once.append(job.id)
            t.note(
                f"job {job.id} ({job.kind}): suspended at {e.at:.3f}, then "
                + (f"{nxt.from_state} -> {nxt.to_state}" if nxt else "nothing")
            )
            return
        t.features["resumed" if nxt.to_state == "running" else f"ended {nxt.to_state}"] += 1
    if n:
        t.features["jobs suspended"] += 1
        t.features["suspensions"] += n


def check_dependencies(t: Tally, acked: list[Acked], infos: dict[int, Any], marks_of: Any) -> None:
    """A dependent (afterok) never runs before its dependency's success is recorded, never
    runs when a dependency ended otherwise (it is cancelled), and is not cancelled when
    every dependency succeeded. Jobs not final (stuck, lost) are counted elsewhere."""
    for a in acked:
        if not a.after or a.id not in infos:
            continue
        info = infos[a.id]
        starts = [m for m in marks_of(a.id) if m.what == "start"]
        for dep in a.after:
            d = infos.get(dep)
            if d is None:
                continue
            why = None
            if d.state != "succeeded":
                t.features[f"dependency {d.state}"] += 1
                if starts or info.state != "cancelled":
                    why = f"ran or was not cancelled ({info.state}) after it {d.state}"
            else:
                t.features["dependency succeeded"] += 1
                first = min((m.at for m in starts), default=None)
                if first is not None and d.ended_at is not None and first < d.ended_at:
                    why = f"began at {first:.3f}, before its success at {d.ended_at:.3f}"
                elif info.state == "cancelled":
                    why = f"was cancelled ({info.error}) although it succeeded"
            if why is not None:
                t.dependency_order.append(a.id)
                t.note(f"job {a.id} after job {dep}: {why}")


def check_state_dir(
    t: Tally,
    job: Acked,
    info: Any,
    marks: list[Mark],
    attempts: list[int] | None,
    kills: list[Kill],
) -> None:
    """The job's state dir keeps what each attempt wrote (``attempts``: the numbers the
    attempts appended, None: no file), across retries and restarts; and count the
    signal_before warnings."""
    written = attempts or []
    started = {m.attempt for m in marks if m.what == "start"}
    # An attempt killed, or out of disk, between its start mark and its write is excused.
    must = {m.attempt for m in marks if m.what == "start" and not _killed(m, kills)}
    bad = sorted(written) != written or not set(written) <= started or not must <= set(written)
    if bad:
        t.state_dir_lost.append(job.id)
        t.note(f"job {job.id} (state): state dir has attempts {written}, started {sorted(started)}")
    warned = sum(1 for m in marks if m.what == "warned")
    t.features["state jobs"] += 1
    if info.state == "timed_out":
        t.features["state jobs timed out"] += 1
        t.features["of those warned"] += warned > 0
    if warned > 1:
        t.features["state jobs warned more than once"] += 1


def scan_log(t: Tally, text: str) -> None:
    """Count tracebacks and ERROR lines in the daemon's log (one round's new part)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            t.tracebacks += 1
            for j in range(i + 1, min(i + 200, len(lines))):
                nxt = lines[j]
                if nxt and not nxt.startswith(
                    (" ", "Traceback", "During handling", "The above exception")
                ):
                    t.log_errors[f"traceback: {nxt[:160]}"] += 1
                    break
        elif m := _LEVEL.search(line):
            # "ERROR gpud: internal error while supervising job 12": the message with its
            # numbers folded, so that one kind of error is counted as one
            msg = re.sub(r"\d+", "N", line[m.end() :])
            t.log_errors[f"{m.group(1).lower()}: {msg[:160]}"] += 1


def summary(t: Tally, meta: dict[str, Any]) -> str:
    v = t.violations()
    lines = [
        f"gpud chaos: {t.rounds} rounds, {t.jobs} acknowledged jobs, executor "
        f"{meta.get('executor')}, {meta.get('seconds', 0):.0f} s",
        "  violations: " + ", ".join(f"{k} {n}" for k, n in v.items()),
        f"  finished jobs marked lost while the ledger had them STARTING "
        f"{len(t.lost_while_starting)} (of {len(t.finished_marked_lost)})",
        f"  retries of lost jobs {t.retries_of_lost}, re-runs after a killed worker's "
        f"done mark {t.reruns_after_killed_done}, phantom jobs (committed but not "
        f"acknowledged) {len(t.phantom_jobs)}, unacknowledged submits "
        f"{t.unacknowledged_submits}",
        "  final states: "
        + ", ".join(f"{k} {n}" for k, n in sorted(t.final_states.items()))
        + " (succeeded: "
        + ", ".join(f"{k} {n}" for k, n in sorted(t.start_kinds.items()))
        + ")",
        "  faults: " + ", ".join(f"{k} {n}" for k, n in sorted(t.faults.items())),
        f"  daemon log: {t.tracebacks} tracebacks, "
        f"{sum(t.log_errors.values())} error lines/traceback ends",
    ]
    if t.features or t.feature_calls:
        lines.append("  features: " + ", ".join(f"{k} {n}" for k, n in sorted(t.features.items())))
        lines.append(
            "  suspend/resume calls: "
            + ", ".join(f"{k} {n}" for k, n in sorted(t.feature_calls.items()))
        )
    for k, n in t.log_errors.most_common(12):
        lines.append(f"    {n:5d} × {k}")
    if t.client_errors:
        lines.append(
            "  client errors: " + ", ".join(f"{k} {n}" for k, n in t.client_errors.most_common(8))
        )
    for e in t.examples[:15]:
        lines.append(f"  - {e}")
    return "\n".join(lines)


def as_json(t: Tally, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": meta,
        "rounds": t.rounds,
        "jobs": t.jobs,
        "violations": t.violations(),
        "violating_jobs": {
            "lost": t.lost,
            "stuck": t.stuck,
            "run_twice": t.run_twice,
            "finished_marked_lost": t.finished_marked_lost,
            "finished_marked_lost_while_starting": t.lost_while_starting,
            "not_one_final_state": t.not_one_final_state,
            "succeeded_without_running": t.succeeded_without_running,
            "wrong_result": t.wrong_result,
            "dependency_order": t.dependency_order,
            "suspension_not_ended_once": t.suspension_not_ended_once,
            "state_dir_lost": t.state_dir_lost,
        },
        "features": dict(t.features),
        "feature_calls": dict(t.feature_calls),
        "ps_disagreements": t.ps_disagreements,
        "daemon_exits": t.daemon_exits,
        "retries_of_lost": t.retries_of_lost,
        "reruns_after_killed_done": t.reruns_after_killed_done,
        "phantom_jobs": t.phantom_jobs,
        "unacknowledged_submits": t.unacknowledged_submits,
        "final_states": dict(t.final_states),
        "start_kinds_of_succeeded": dict(t.start_kinds),
        "faults": dict(t.faults),
        "fault_log": t.fault_log,
        "client_errors": dict(t.client_errors),
        "log": {"tracebacks": t.tracebacks, "errors": dict(t.log_errors)},
        "round_seconds": {
            "mean": (sum(t.round_seconds) / len(t.round_seconds)) if t.round_seconds else 0.0,
            "max": max(t.round_seconds, default=0.0),
        },
        "examples": t.examples,
    }
