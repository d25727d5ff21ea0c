"""A stand-in for AsyncClient with fixed data, for the TUI's snapshot and robustness tests.

The behaviour tests run the TUI against a real daemon; these need what a real daemon
cannot give: a screen that is the same on every run (fixed times, GPU readings that
move), answers no daemon would send, and a ledger of 10,000 jobs without running them.
It answers like the daemon does (paging, cursors, queue order) from plain lists.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from typing import Any

import msgspec

from gpud_client import ApiError
from gpud_client.models import (
    EventInfo,
    EventList,
    GpuHistory,
    GpuInfo,
    GpuList,
    GpuProcessInfo,
    GpuSeries,
    Health,
    JobInfo,
    JobList,
    JobOutcome,
    QueuePage,
)

NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
GIB = 1024**3
H100 = "NVIDIA H100 80GB HBM3"


def job(id: int, name: str, owner: str, state: str, **kw: Any) -> JobInfo:
    base: dict[str, Any] = dict(
        id=id,
        name=name,
        state=state,
        owner=owner,
        priority=0,
        gpu=None,
        gpus=[],
        gpu_indices=[],
        submitted_at=NOW - 7200 + id * 60,
        started_at=None,
        ended_at=None,
        timeout=86400.0,
        retries=0,
        attempt=0,
        batch_id=None,
        exit_code=None,
        error=None,
        has_result=False,
        python="3.11.7",
    )
    base.update(kw)
    return JobInfo(**base)


def gpu(index: int, name: str, gpu_type: str, total_gib: int, **kw: Any) -> GpuInfo:
    base: dict[str, Any] = dict(
        index=index,
        uuid=f"GPU-{index:08x}-7a1c-4e0b-9d3f-00000000000{index}",
        name=name,
        type=gpu_type,
        aliases=[],
        memory_total=total_gib * GIB,
        memory_used=0,
        utilization=0,
        memory_utilization=0,
        temperature=34,
        power_w=70.0,
        power_limit_w=700.0,
        processes=[],
        fake=False,
        busy_foreign=False,
        job_id=None,
        owner=None,
    )
    base.update(kw)
    return GpuInfo(**base)


def _curve(index: int, i: int) -> tuple[int, float]:
    """A GPU's utilisation and memory fraction at reading i of 150 (deterministic)."""
    if index in (0, 1):  # a training job: ramps up, then busy with dips at checkpoints
        util = min(97, i * 3) - (40 if i % 37 in (0, 1) else 0) - (i * 7 + index) % 5
        return max(0, util), min(0.89, i * 0.02)
    if index == 2:  # someone's notebook, outside gpud
        return int(35 + 30 * math.sin(i / 6)), 0.29
    if index == 3:  # an evaluation sweep: one item after another
        return (i * 11) % 70 + 20 if i > 100 else 0, 0.41 if i > 100 else 0.0
    return 0, 0.0


def demo() -> tuple[GpuList, GpuHistory, list[JobInfo]]:
    """A shared box on a weekday morning: what docs/tui.svg shows."""
    reason = (
        "waiting for {}: GPUs 0,1 held by job 41 (alice), GPU 2 busy with processes "
        "gpud did not start (pid 48213)"
    )
    jobs = [
        job(
            38,
            "hello.square",
            "bob",
            "succeeded",
            started_at=NOW - 5400,
            ended_at=NOW - 5399.2,
            attempt=1,
            exit_code=0,
            has_result=True,
        ),
        job(
            39,
            "prep.tokenize",
            "carol",
            "timed_out",
            started_at=NOW - 4900,
            ended_at=NOW - 1300,
            attempt=1,
            error="timed out after 1 h",
            timeout=3600.0,
        ),
        job(
            40,
            "finetune.train",
            "alice",
            "cancelled",
            gpu=["h100:2"],
            attempt=1,
            gpu_indices=[0, 1],
            started_at=NOW - 5200,
            ended_at=NOW - 5100,
            error="cancelled",
        ),
        job(
            41,
            "finetune.train",
            "alice",
            "running",
            gpu=["h100:2"],
            attempt=1,
            gpus=[
                "GPU-00000000-7a1c-4e0b-9d3f-000000000000",
                "GPU-00000001-7a1c-4e0b-9d3f-000000000001",
            ],
            gpu_indices=[0, 1],
            started_at=NOW - 5025.4,
        ),
        job(
            42,
            "sweep.eval",
            "bob",
            "failed",
            gpu=["l4"],
            gpu_indices=[3],
            attempt=2,
            retries=1,
            started_at=NOW - 900,
            ended_at=NOW - 880.5,
            exit_code=1,
            has_result=True,
            error="RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
        ),
        job(
            43,
            "prep.tokenize",
            "carol",
            "succeeded",
            started_at=NOW - 650,
            ended_at=NOW - 601.8,
            attempt=1,
            exit_code=0,
            has_result=True,
        ),
        job(
            44,
            "sweep.eval",
            "bob",
            "running",
            gpu=["l4"],
            gpu_indices=[3],
            attempt=1,
            gpus=["GPU-00000003-7a1c-4e0b-9d3f-000000000003"],
            started_at=NOW - 312.7,
        ),
        job(
            45,
            "sweep.eval",
            "bob",
            "queued",
            gpu=["h100"],
            position=1,
            reason=reason.format("1 x h100"),
        ),
        job(
            46,
            "finetune.train",
            "carol",
            "queued",
            gpu=["h100:2"],
            position=2,
            reason=reason.format("2 x h100"),
        ),
        job(
            47,
            "finetune.train",
            "alice",
            "queued",
            gpu=["h100:2", "a100:4"],
            priority=-1,
            position=3,
            reason=reason.format("2 x h100 or 4 x a100") + "; this box can never fit 4 x a100",
        ),
    ]
    gpus = [
        gpu(
            0,
            H100,
            "h100",
            80,
            memory_used=int(71.3 * GIB),
            utilization=97,
            temperature=67,
            power_w=612.0,
            job_id=41,
            owner="alice",
        ),
        gpu(
            1,
            H100,
            "h100",
            80,
            memory_used=int(70.9 * GIB),
            utilization=94,
            temperature=65,
            power_w=598.0,
            job_id=41,
            owner="alice",
        ),
        gpu(
            2,
            H100,
            "h100",
            80,
            memory_used=23 * GIB,
            utilization=41,
            temperature=51,
            power_w=240.0,
            busy_foreign=True,
            processes=[GpuProcessInfo(pid=48213, used_memory=23 * GIB, job_id=None)],
        ),
        gpu(
            3,
            "NVIDIA L4",
            "l4",
            24,
            memory_used=int(9.8 * GIB),
            utilization=62,
            temperature=58,
            power_w=48.0,
            power_limit_w=72.0,
            job_id=44,
            owner="bob",
        ),
    ]
    series = []
    for g in gpus:
        readings = [_curve(g.index, i) for i in range(150)]
        series.append(
            GpuSeries(
                index=g.index,
                uuid=g.uuid,
                memory_total=g.memory_total,
                at=[NOW - 2.0 * (149 - i) for i in range(150)],
                utilization=[u for u, _ in readings],
                memory_used=[int(m * g.memory_total) for _, m in readings],
            )
        )
    return (
        GpuList(gpus=gpus, source="nvml", note=None),
        GpuHistory(interval=2.0, window=300.0, gpus=series),
        jobs,
    )


class FakeClient:
    """Answers from lists; ``fail`` (an exception) is raised by every call while set."""

    url = "unix:///run/gpud/gpud.sock"

    def __init__(self, gpus: GpuList, history: GpuHistory, jobs: Iterable[JobInfo]) -> None:
        self.gpu_list = gpus
        self.history = history
        self.jobs = {j.id: j for j in jobs}
        self.latest = len(self.jobs) * 3
        self.fail: BaseException | None = None
        self.calls: list[str] = []
        self.logs: dict[int, bytes] = {}

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail is not None:
            raise self.fail

    async def health(self) -> Health:
        self._call("health")
        return Health(
            status="ok",
            version="0.1.0",
            executor="process",
            worker_python="3.11.7",
            gpu_source=self.gpu_list.source,
            pid=1234,
            started_at=NOW - 86400,
        )

    async def gpus(self) -> GpuList:
        self._call("gpus")
        return self.gpu_list

    async def gpu_history(self, since: float | None = None) -> GpuHistory:
        self._call("gpu_history")
        if since is None:
            return self.history
        keep = []
        for s in self.history.gpus:
            n = sum(1 for t in s.at if t > since)
            cut = len(s.at) - n
            keep.append(
                msgspec.structs.replace(
                    s,
                    at=s.at[cut:],
                    utilization=s.utilization[cut:],
                    memory_used=s.memory_used[cut:],
                )
            )
        return msgspec.structs.replace(self.history, gpus=keep)

    async def events(
        self, after: int = 0, *, limit: int = 100, job_id: int | None = None
    ) -> EventList:
        self._call("events")
        events = (
            [
                EventInfo(
                    id=self.latest,
                    job_id=job_id or 0,
                    at=NOW,
                    from_state=None,
                    to_state="queued",
                    reason="submitted",
                )
            ]
            if after < self.latest
            else []
        )
        return EventList(
            events=events[:limit],
            cursor=max(after, self.latest) if events else after,
            latest=self.latest,
        )

    async def queue(self, *, offset: int = 0, limit: int = 50) -> QueuePage:
        self._call("queue")
        queued = sorted(
            (j for j in self.jobs.values() if j.state == "queued"),
            key=lambda j: (j.position or 0, j.id),
        )
        return QueuePage(jobs=queued[offset : offset + limit], total=len(queued), offset=offset)

    async def list_jobs(
        self,
        state: Any = None,
        *,
        limit: int = 50,
        cursor: int | None = None,
        owner: str | None = None,
    ) -> JobList:
        self._call("list_jobs")
        states = None if state is None else ({state} if isinstance(state, str) else set(state))
        picked = []
        for j in sorted(self.jobs.values(), key=lambda j: -j.id):
            if cursor is not None and j.id >= cursor:
                continue
            if (states and j.state not in states) or (owner and j.owner != owner):
                continue
            picked.append(j)
            if len(picked) == limit:
                break
        nxt = picked[-1].id if len(picked) == limit and picked[-1].id > 1 else None
        return JobList(jobs=picked, next_cursor=nxt)

    async def get_job(self, job_id: int) -> JobInfo:
        self._call("get_job")
        if job_id not in self.jobs:
            raise ApiError(404, "not_found", f"no job {job_id}")
        return self.jobs[job_id]

    async def outcome(self, job_id: int) -> JobOutcome:
        self._call("outcome")
        raise ApiError(404, "no_outcome", "no outcome")

    async def result(self, job_id: int) -> bytes:
        self._call("result")
        raise ApiError(404, "no_result", "no result")

    async def cancel(self, job_id: int, *, timeout: float | None = None) -> JobInfo:  # noqa: ASYNC109
        self._call("cancel")
        j = msgspec.structs.replace(self.jobs[job_id], state="cancelled", error="cancelled")
        self.jobs[job_id] = j
        self.latest += 1
        return j

    async def log_bytes(
        self, job_id: int, *, follow: bool = False, offset: int = 0
    ) -> AsyncIterator[bytes]:
        self._call("log_bytes")
        yield self.logs.get(job_id, b"")[offset:]

    async def aclose(self) -> None:
        pass


def many_jobs(n: int) -> list[JobInfo]:
    """A ledger of n finished jobs and a few running ones."""
    states = ("succeeded", "succeeded", "failed", "cancelled")
    out = [
        job(
            i,
            "sweep.eval",
            ("alice", "bob", "carol")[i % 3],
            states[i % 4],
            started_at=NOW - 100,
            ended_at=NOW - 50,
            attempt=1,
        )
        for i in range(1, n + 1)
    ]
    for i in (7, 8):
        out[i - 1] = job(i, "finetune.train", "alice", "running", started_at=NOW - 9000, attempt=1)
    return out
