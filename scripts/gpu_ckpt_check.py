#!/usr/bin/env python3
"""GPU checkpointing on a real NVIDIA GPU (#13), through gpud.cudackpt alone (no daemon).

    python3 scripts/gpu_ckpt_check.py [--gib 8] [--rounds 2] [--timeout 170] [--json FILE]

1. the driver's CUDA checkpoint API is found (gpud.cudackpt.open_cuda_checkpointer);
2. a child process fills --gib GiB of GPU memory (torch if it imports, else the driver API
   through ctypes: cuMemAlloc + cuMemsetD32 per 256 MiB chunk) and computes a checksum;
3. --rounds times: park it (lock + checkpoint), read NVML to show the memory freed, unpark it
   (restore + unlock; with an identity GPU map where the driver can remap, which exercises
   CUcheckpointRestoreArgs.gpuPairs), read NVML again. Park and unpark seconds and GB/s are
   printed against the PCIe limit (link generation x width from NVML, sampled during the
   transfers, since an idle link trains down);
4. the child recomputes its checksum: it must match;
5. for the record: what cuCheckpointProcessGetState answers for a process without CUDA,
   and the restore thread id.

Prints PASS/FAIL/INFO lines and a summary; exits 0 when all passed, 1 when any failed, 0 with
a SKIP line on a machine without an NVIDIA GPU (2 with --require-gpu). The child is killed
on every exit path, so nothing stays locked or parked. Bounded by --timeout (SIGALRM).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from gpu_check_common import PCIE_LANE_GBS, Report

GIB = 1024**3

CHILD = r"""
import ctypes, os, sys, zlib
gib = float(sys.argv[1])
size = int(gib * 2**30) // (256 * 2**20) * (256 * 2**20)
try:
    import torch
    if not torch.cuda.is_available():
        raise ImportError("torch without CUDA")
except ImportError:
    torch = None
if torch is not None:
    x = torch.empty(size // 4, dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda")
    g.manual_seed(1234)
    x.random_(generator=g)
    torch.cuda.synchronize()
    how = "torch " + torch.__version__

    def checksum():
        total = 0
        for i, c in enumerate(x.split(1 << 26)):  # position matters chunk by chunk
            total += int(c.sum(dtype=torch.int64).item()) * (i + 1)
            total += int(c[::4099].to(torch.int64).sum().item())
        return total
else:
    cu = ctypes.CDLL("libcuda.so.1")
    def ok(rc, what):
        if rc != 0:
            raise SystemExit(f"CHILD-ERROR {what} failed: CUresult {rc}")
    dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    ok(cu.cuInit(0), "cuInit")
    ok(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ok(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    ok(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    ok(cu.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size)), "cuMemAlloc")
    chunk = 256 * 2**20
    for i in range(size // chunk):
        value = (0x9E3779B1 * (i + 1)) & 0xFFFFFFFF
        ok(cu.cuMemsetD32_v2(ctypes.c_uint64(ptr.value + i * chunk), ctypes.c_uint(value),
                             ctypes.c_size_t(chunk // 4)), "cuMemsetD32")
    ok(cu.cuCtxSynchronize(), "cuCtxSynchronize")
    buf = ctypes.create_string_buffer(chunk)
    how = "CUDA driver API (ctypes)"

    def checksum():
        crc = 0
        for i in range(size // chunk):
            ok(cu.cuMemcpyDtoH_v2(buf, ctypes.c_uint64(ptr.value + i * chunk),
                                  ctypes.c_size_t(chunk)), "cuMemcpyDtoH")
            crc = zlib.crc32(buf.raw, crc)
        return crc
print("READY", os.getpid(), size, checksum(), how, flush=True)
for line in sys.stdin:
    if line.strip() == "VERIFY":
        print("CHECKSUM", checksum(), flush=True)
    elif line.strip() == "EXIT":
        break
"""


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"the child said nothing in {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the child exited (rc {proc.wait()})")
    return line.strip()


class LinkSampler:
    """Samples the PCIe link (generation, width) while a transfer runs: an idle link trains
    down to gen 1, so a reading before or after the transfer would understate the limit."""

    def __init__(self, pynvml: object, handle: object) -> None:
        self.nv, self.h = pynvml, handle
        self.best = (0, 0)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        nv = self.nv
        while not self._stop.is_set():
            try:
                g = nv.nvmlDeviceGetCurrPcieLinkGeneration(self.h)  # type: ignore[attr-defined]  # newer NVML
                w = nv.nvmlDeviceGetCurrPcieLinkWidth(self.h)  # type: ignore[attr-defined]  # newer NVML
                self.best = max(self.best, (int(g), int(w)))
            except Exception:  # noqa: BLE001 - no reading: the max-link figure stands
                return
            self._stop.wait(0.05)

    def __enter__(self) -> LinkSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(2)


def main() -> int:  # noqa: C901 - one straight script, step by step
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=8.0, help="GPU memory the child fills")
    ap.add_argument("--rounds", type=int, default=2, help="park/unpark cycles")
    ap.add_argument("--timeout", type=float, default=170.0, help="for the whole check")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 without a GPU")
    args = ap.parse_args()
    rep = Report()

    try:
        import pynvml  # type: ignore[import-untyped]  # ships no hints

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as e:  # noqa: BLE001 - a check script: report, go on
        count, why = 0, f"NVML: {type(e).__name__}: {e}"
    else:
        why = "NVML reports no GPUs"
    if count == 0:
        print(f"SKIP: no NVIDIA GPU here ({why}); GPU checkpointing not checked", flush=True)
        return 2 if args.require_gpu else 0

    def on_alarm(*_: object) -> None:
        raise TimeoutError(f"the check ran past --timeout {args.timeout:.0f} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.timeout)))

    from gpud.cudackpt import CudaCheckpointError, LibCuda, ProcessState, open_cuda_checkpointer

    driver = pynvml.nvmlSystemGetDriverVersion()
    driver = driver.decode() if isinstance(driver, bytes) else driver
    ck, support = open_cuda_checkpointer(driver)
    rep.figures["support"] = dataclasses.asdict(support)
    if not rep.check(ck is not None, f"the CUDA checkpoint API: {support.reason}"):
        return 1
    assert ck is not None

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(args.gib)],
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    plain = subprocess.Popen(["sleep", "600"])
    try:
        t0 = time.monotonic()
        line = read_line(child, min(120.0, args.timeout))
        if not line.startswith("READY "):
            rep.check(False, f"the child did not start: {line}")
            return 1
        _, pid_s, size_s, sum_s, how = line.split(" ", 4)
        pid, size, checksum0 = int(pid_s), int(size_s), int(sum_s)
        rep.check(
            pid == child.pid,
            f"child {pid} holds {size / GIB:.1f} GiB on the GPU via "
            f"{how} (ready in {time.monotonic() - t0:.1f} s)",
        )

        # Which GPU it is on, from NVML's process lists.
        handle, uuid = None, None
        for i in range(count):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            if any(int(p.pid) == pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)):
                handle, uuid = h, pynvml.nvmlDeviceGetUUID(h)
                uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            rep.info("NVML does not list the child on any GPU (in a container?): using GPU 0")
        try:
            gen = pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)
            width = pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle)
        except pynvml.NVMLError:
            gen, width = 0, 0
        rep.info(
            f"GPU {uuid}; PCIe max link gen {gen} x{width}: "
            f"{PCIE_LANE_GBS.get(gen, 0) * width:.1f} GB/s per direction"
        )

        def used() -> tuple[float, float | None]:
            dev = pynvml.nvmlDeviceGetMemoryInfo(handle).used / GIB
            mine = [
                p.usedGpuMemory
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if int(p.pid) == pid and p.usedGpuMemory is not None
            ]
            return dev, (sum(mine) / GIB if mine else None)

        def gbs(nbytes: float, seconds: float) -> str:
            return f"{nbytes / seconds / 1e9:.1f} GB/s" if seconds > 0 else "-"

        st = ck.state(pid)
        rep.check(st is ProcessState.RUNNING, f"the child's CUDA state is {st}")
        rounds = []
        for r in range(1, args.rounds + 1):
            dev0, mine0 = used()
            with LinkSampler(pynvml, handle) as link_out:
                parked = ck.park(pid, timeout=10)
            dev1, mine1 = used()
            st = ck.state(pid)
            move = parked.seconds - parked.lock_seconds
            est = parked.bytes or size
            lock_ms = parked.lock_seconds * 1e3
            rep.check(
                st is ProcessState.CHECKPOINTED,
                f"round {r}: parked in {parked.seconds:.2f} s (lock {lock_ms:.1f} ms); "
                f"size estimate (NVML) {est / GIB:.2f} GiB; {gbs(est, move)}",
            )
            freed = dev0 - dev1
            rep.check(
                freed >= 0.9 * size / GIB and not mine1,
                f"round {r}: NVML shows the GPU memory freed: device used {dev0:.2f} -> "
                f"{dev1:.2f} GiB (-{freed:.2f}); the child's {mine0} -> {mine1} GiB",
            )
            if r == 1:
                try:
                    assert isinstance(ck.driver, LibCuda)
                    tid = ck.driver.restore_thread_id(pid)
                    rep.info(f"restore thread id of the child: {tid}")
                except CudaCheckpointError as e:
                    rep.info(f"restore thread id: {e}")
            gpu_map = {uuid: uuid} if (support.remap and uuid and r == 1) else None
            with LinkSampler(pynvml, handle) as link_in:
                try:
                    back = ck.unpark(pid, gpu_map)
                except CudaCheckpointError as e:
                    if gpu_map is None:
                        raise
                    rep.check(False, f"unpark with an identity GPU map (gpuPairs): {e}")
                    back = ck.unpark(pid)
            dev2, mine2 = used()
            st = ck.state(pid)
            rep.check(
                st is ProcessState.RUNNING,
                f"round {r}: unparked in {back.seconds:.2f} s"
                f"{' (identity GPU map)' if gpu_map else ''}; {gbs(est, back.seconds)}; "
                f"device used {dev2:.2f} GiB, the child's {mine2} GiB",
            )
            g_out, g_in = link_out.best, link_in.best
            for name, (g, w), secs in (("park", g_out, move), ("unpark", g_in, back.seconds)):
                limit = PCIE_LANE_GBS.get(g, 0) * w
                if limit and secs > 0:
                    rep.info(
                        f"round {r} {name}: {est / secs / 1e9:.1f} GB/s = "
                        f"{est / secs / 1e9 / limit:.0%} of PCIe gen {g} x{w} "
                        f"({limit:.1f} GB/s, link seen during the transfer)"
                    )
            rounds.append(
                {
                    "park_s": parked.seconds,
                    "lock_s": parked.lock_seconds,
                    "unpark_s": back.seconds,
                    "bytes": est,
                    "alloc_bytes": size,
                    "freed_gib": freed,
                    "link_park": g_out,
                    "link_unpark": g_in,
                    "park_gbs": est / move / 1e9 if move > 0 else None,
                    "unpark_gbs": est / back.seconds / 1e9 if back.seconds > 0 else None,
                }
            )
        rep.figures["rounds"] = rounds
        rep.figures["pcie_max"] = [gen, width]

        assert child.stdin is not None
        child.stdin.write("VERIFY\n")
        child.stdin.flush()
        line = read_line(child, 60)
        rep.check(
            line == f"CHECKSUM {checksum0}",
            f"the child's memory is intact after {args.rounds} park/unpark round(s): "
            f"{line} (was {checksum0})",
        )

        # For the record: what the driver says of a process without CUDA (gpud.cudackpt
        # takes some CUresults to mean "no CUDA state"; this shows which one it really is).
        try:
            raw = ck.driver.get_state(plain.pid)
            rep.info(f"a process without CUDA: GetState says {raw}")
        except CudaCheckpointError as e:
            try:
                seen = f"gpud reads it as {ck.state(plain.pid)} (None: no CUDA state)"
            except CudaCheckpointError:
                seen = "gpud does NOT read it as 'no CUDA state': add it to cudackpt._NO_CUDA"
            rep.info(f"a process without CUDA: GetState fails with {e.result}; {seen}")
    except (CudaCheckpointError, TimeoutError, RuntimeError, ValueError) as e:
        rep.check(False, f"{type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
        plain.kill()
        if child.poll() is None:
            try:
                assert child.stdin is not None
                child.stdin.write("EXIT\n")
                child.stdin.flush()
                child.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                child.kill()  # also ends a locked or parked child: nothing is left behind
        child.wait()
        plain.wait()
    if args.json:
        args.json.write_text(json.dumps(rep.figures, indent=1, default=str))
    print(f"gpu_ckpt_check: {rep.passed} passed, {rep.failed} failed", flush=True)
    return 0 if rep.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
