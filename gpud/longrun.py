"""Long runs (#14): the early warning before a job's timeout, its stop grace, and the
words its events use for how a stop ended.

The supervisor (gpud.daemon.supervise) calls in here from a line or two: at submit
:func:`check_options`, when a job starts :func:`start_warning`, when it is stopped
:func:`grace_of` and :func:`stop_text`. The warning goes to the job's leader process
(the worker, where Python's signal handlers live), never to its whole group: children a
job started see it only if the job forwards it, as with Slurm's ``--signal`` without
``B:``.
"""

from __future__ import annotations

import logging
import os
import signal as signals
from pathlib import Path

import trio

from gpud.config import Config
from gpud.domain import Job, JobState
from gpud.executors.base import Handle
from gpud.safefs import open_append

__all__ = [
    "DEFAULT_SIGNAL",
    "LongRunError",
    "check_options",
    "grace_of",
    "job_env",
    "parse_signal",
    "start_warning",
    "stop_text",
    "task_env",
]

log = logging.getLogger("gpud")

DEFAULT_SIGNAL = "SIGUSR1"
#: Signals a job may ask to be warned with: the ones a program can catch and that mean
#: nothing else to gpud (TERM and KILL are its stop; STOP/CONT its suspend).
_ALLOWED = (
    "SIGUSR1",
    "SIGUSR2",
    "SIGINT",
    "SIGHUP",
    "SIGQUIT",
    "SIGALRM",
    "SIGWINCH",
    "SIGURG",
    "SIGXCPU",
    "SIGPWR",
)


class LongRunError(ValueError):
    """A submit's signal_before / signal / grace cannot be accepted; ``code`` names the
    field for the API's error body."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_signal(name: str) -> signals.Signals:
    """ "SIGUSR1", "USR1", "usr1" -> SIGUSR1; ValueError that lists the choices otherwise."""
    text = name.strip().upper()
    if not text.startswith("SIG"):
        text = "SIG" + text
    if text not in _ALLOWED or not hasattr(signals, text):
        choices = ", ".join(s for s in _ALLOWED if hasattr(signals, s))
        raise ValueError(
            f"signal {name!r} cannot be used for the early warning: pick one "
            f"of {choices} (default {DEFAULT_SIGNAL})"
        )
    return signals.Signals[text]


def check_options(
    cfg: Config,
    timeout: float,
    signal_before: float | None,
    signal: str | None,
    grace: float | None,
) -> tuple[str | None, float | None]:
    """Check a submit's long-run options against each other and this daemon's limits;
    return (the signal's canonical name or None, grace). Raises LongRunError."""
    name: str | None = None
    if signal is not None:
        try:
            name = parse_signal(signal).name
        except ValueError as e:
            raise LongRunError("invalid_signal", str(e)) from None
        if signal_before is None:
            raise LongRunError(
                "invalid_signal",
                f"signal={signal!r} needs signal_before= "
                '(how long before the timeout to send it), e.g. "5m"',
            )
    if signal_before is not None and signal_before >= timeout:
        raise LongRunError(
            "invalid_signal_before",
            f"signal_before ({signal_before:g} s) must be shorter than the job's timeout "
            f"({timeout:g} s): the warning would come before the job starts; lower it, or "
            "raise timeout",
        )
    if grace is not None and grace > cfg.max_grace:
        raise LongRunError(
            "invalid_grace",
            f"grace ({grace:g} s) is above this daemon's max_grace ({cfg.max_grace:g} s): "
            "ask for less, or ask the admin to raise max_grace",
        )
    return name, grace


def grace_of(job: Job, cfg: Config) -> float:
    """Seconds between SIGTERM and SIGKILL for this job: its grace=, else kill_grace;
    never above max_grace (an admin may have lowered it since the submit)."""
    grace = cfg.kill_grace if job.grace is None else job.grace
    return min(grace, max(cfg.max_grace, 0.0))


def _fmt(seconds: float) -> str:
    return f"{seconds:g} s"


def stop_text(why: str, stop_as: JobState, killed: bool | None, grace: float) -> str:
    """The reason recorded for a stopped job: what stopped it, and which signal ended
    it. ``killed`` None: the executor cannot tell (the words stay as they were)."""
    if killed is None:
        return why
    if killed:
        return f"{why}: killed (SIGKILL) after {_fmt(grace)} grace"
    after = "after cancel" if stop_as is JobState.CANCELLED else "before the grace ran out"
    return f"{why}: ended by SIGTERM {after}"


def job_env(job: Job, state_dir: str) -> dict[str, str]:
    """What a job's environment gets from its long-run options (and its state
    directory, where its worker sees it)."""
    env = {"GPUD_STATE_DIR": state_dir}
    if job.signal_before:
        env["GPUD_SIGNAL"] = job.signal or DEFAULT_SIGNAL
        env["GPUD_SIGNAL_BEFORE"] = f"{job.signal_before:g}"
    return env


def task_env(job: Job, task_dir: str) -> dict[str, str]:
    """The same, per task of a warm worker (which sees the job directory at task_dir):
    empty values clear what an earlier job of the worker had."""
    return {"GPUD_SIGNAL": "", "GPUD_SIGNAL_BEFORE": "", **job_env(job, f"{task_dir}/state")}


def start_warning(
    nursery: trio.Nursery | None,
    executor: object,
    job: Job,
    handle: Handle,
    deadline: trio.CancelScope,
    log_path: Path,
) -> trio.CancelScope | None:
    """Start the early warning of a job that asked for one, in ``nursery``: it fires
    ``signal_before`` before ``deadline.deadline`` (the supervisor's, which may move
    while a job is suspended). Cancel the scope returned when the job ends."""
    if not job.signal_before or nursery is None:
        return None
    cs = trio.CancelScope()
    sig = parse_signal(job.signal or DEFAULT_SIGNAL)
    nursery.start_soon(
        _warn, cs, executor, job.id, job.signal_before, sig, handle, deadline, log_path
    )
    return cs


async def _warn(
    cs: trio.CancelScope,
    executor: object,
    job_id: int,
    before: float,
    sig: signals.Signals,
    handle: Handle,
    deadline: trio.CancelScope,
    log_path: Path,
) -> None:
    with cs:
        while True:
            target = deadline.deadline - before
            now = trio.current_time()
            if now >= target:
                break
            # Looked at again every few seconds: the deadline moves while a job is
            # suspended (#13), and a later one must not get an early warning.
            await trio.sleep_until(min(target, now + 5.0))
        if deadline.cancel_called:
            return
        send = getattr(executor, "send_signal", None)
        # An executor without send_signal (a test fake of old) gets no warning.
        sent = bool(send is not None and await send(handle, sig))
        left = max(0.0, deadline.deadline - trio.current_time())
        line = (
            f"[gpud] sent {sig.name}: the job's timeout is in {left:.0f} s "
            f"(signal_before); it is then stopped\n"
            if sent
            else f"[gpud] could not send {sig.name} (the job's process is gone)\n"
        )
        log.info("job %s: %s", job_id, line.strip())
        try:
            fd = open_append(log_path)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # the log is the job's to break; the warning itself went out
