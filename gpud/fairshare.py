"""Fair share and the multifactor priority: pure functions of usage, jobs and time.

Modelled on Slurm's multifactor priority plugin, cut down to what one shared box needs:

    priority = job.priority + fairshare_weight * F(owner) + age_weight * A(job)

* ``F`` is Slurm's classic fair-share factor ``2 ** (-U / S)``: ``U`` is the owner's
  share of all decayed GPU-seconds, ``S = 1 / N`` the share each of the ``N`` users in
  play is entitled to (equal shares). 1 for someone who used nothing, 0.5 for someone who
  used exactly their share, towards 0 for a heavy user.
* Usage decays with a half-life (Slurm's ``PriorityDecayHalfLife``, 7 days by default):
  a GPU-second used one half-life ago counts half. The integral over an interval has a
  closed form, so a job's usage is exact whatever its length.
* ``A`` is the job's age (time since submit) over ``max_age``, capped at 1, so a job
  that waited long enough overtakes fresher ones of higher priority, and nobody starves.
* A CPU-only job whose owner holds no CPU slot now gets ``cpu_share_weight`` more (#12).
  Usage counts GPU-seconds only, so without it CPU jobs were plain FIFO: one user's
  100,000-job sweep kept every other user's CPU job behind all of it. With it, a user with
  no CPU job running takes the next free slot; two users who both hold one are in FIFO
  order again (small against the fair-share weight, so GPU usage still decides first).

Nothing here reads a clock: ``now`` is always passed in, so decay and ageing are tested
in zero real time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gpud.domain import Job

__all__ = [
    "DecayedTotals",
    "Policy",
    "fairshare_factors",
    "interval_usage",
    "job_priority",
]

_DAY = 86400.0


@dataclass(frozen=True, slots=True)
class Policy:
    """The weights of the multifactor priority (settings of the same names)."""

    half_life: float = 7 * _DAY
    fairshare_weight: float = 1000.0
    age_weight: float = 100.0
    max_age: float = 7 * _DAY
    #: what a CPU-only job gets when its owner holds no CPU slot now (see the module doc)
    cpu_share_weight: float = 10.0

    def __post_init__(self) -> None:
        if not self.half_life > 0:
            raise ValueError("the fair-share half-life must be positive")


def interval_usage(start: float, end: float, gpus: int, *, now: float, half_life: float) -> float:
    """Decayed GPU-seconds, as seen at ``now``, of ``gpus`` GPUs held from start to end.

    The integral of ``gpus * 2 ** (-(now - t) / half_life)`` over [start, end]; the part
    of the interval after ``now`` does not count yet.
    """
    end = min(end, now)
    if end <= start or gpus <= 0:
        return 0.0
    k = math.log(2.0) / half_life
    # e^{-k(now-end)} - e^{-k(now-start)}, written with expm1 so that a short interval long
    # ago does not vanish in the cancellation of two numbers close to each other.
    return gpus * math.exp(-k * (now - end)) * -math.expm1(-k * (end - start)) / k


def fairshare_factors(usage: Mapping[str, float], users: Iterable[str]) -> dict[str, float]:
    """Each user's fair-share factor in (0, 1]: ``2 ** (-U / S)`` with equal shares.

    ``usage`` maps users to decayed GPU-seconds; ``users`` are those in play (owners of
    queued and running jobs). Everyone with usage counts towards ``N`` too: a heavy user
    who paused for an hour has not earned a clean slate.
    """
    names = set(users) | {u for u, v in usage.items() if v > 0}
    if not names:
        return {}
    total = sum(max(0.0, usage.get(u, 0.0)) for u in names)
    if total <= 0:
        return dict.fromkeys(names, 1.0)
    share = 1.0 / len(names)
    return {u: 2.0 ** (-(max(0.0, usage.get(u, 0.0)) / total) / share) for u in names}


def job_priority(job: Job, *, now: float, factor: float, policy: Policy) -> float:
    """The job's effective priority: its own, plus fair share, plus age."""
    age = max(0.0, now - job.submitted_at)
    aged = min(1.0, age / policy.max_age) if policy.max_age > 0 else 1.0
    return job.priority + policy.fairshare_weight * factor + policy.age_weight * aged


class DecayedTotals:
    """Running per-user sums of decayed GPU-seconds, kept up to date incrementally.

    Decay is a common factor, so a sum is stored as its value at a reference time and
    scaled on reading; adding a finished interval is O(1) and no history is rescanned.
    The reference moves forward now and then so that the scale factor stays small.
    """

    def __init__(self, half_life: float, now: float) -> None:
        self.half_life = half_life
        self._ref = now
        self._sums: dict[str, float] = {}

    def _rebase(self, now: float) -> None:
        if now - self._ref > self.half_life:
            scale = 2.0 ** (-(now - self._ref) / self.half_life)
            self._sums = {u: v * scale for u, v in self._sums.items()}
            self._ref = now

    def add(self, user: str, start: float, end: float, gpus: int, *, now: float) -> None:
        """Count ``gpus`` GPUs held by ``user`` from start to end (as of ``now``)."""
        self._rebase(now)
        value = interval_usage(start, end, gpus, now=now, half_life=self.half_life)
        if value > 0:
            back = 2.0 ** ((now - self._ref) / self.half_life)
            self._sums[user] = self._sums.get(user, 0.0) + value * back

    def at(self, now: float) -> dict[str, float]:
        """Every user's decayed GPU-seconds as of ``now``."""
        scale = 2.0 ** (-(now - self._ref) / self.half_life)
        return {u: v * scale for u, v in self._sums.items()}
