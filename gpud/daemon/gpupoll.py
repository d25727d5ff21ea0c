"""GPU polling: the inventory read every gpu_poll_interval; other processes on the GPUs
are noticed (their GPUs are not handed out)."""

from __future__ import annotations

import dataclasses
import logging

import trio

from gpud.daemon.core import DaemonCore

log = logging.getLogger("gpud")


class GpuPolling(DaemonCore):
    async def _gpu_loop(self) -> None:
        while True:
            await trio.sleep(self.config.gpu_poll_interval)
            try:
                await self._refresh_gpus()
            except Exception:  # noqa: BLE001 - a bad NVML read must not stop scheduling
                log.exception("reading the GPU inventory failed")

    async def _refresh_gpus(self) -> None:
        snap = await trio.to_thread.run_sync(self.inventory.snapshot)
        handles = self.handles()
        out = []
        for g in snap:
            foreign = tuple(
                p.pid for p in g.processes if self.executor.job_for_pid(p.pid, handles) is None
            )
            out.append(dataclasses.replace(g, foreign_pids=foreign))
        before = [g.foreign_pids for g in self.gpus]
        self.gpus = out
        self.gpu_history.record(out, self.clock.time())
        if before != [g.foreign_pids for g in out]:
            self._reschedule()
