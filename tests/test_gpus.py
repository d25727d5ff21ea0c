"""GPU inventories: name normalisation, fake GPUs, open_inventory, and NVML.

NVML is exercised two ways: against a stand-in pynvml (monkeypatched) everywhere, and
against the real driver in the ``gpu``-marked tests, which skip on a GPU-less machine.
"""

from __future__ import annotations

import re
import threading
from types import SimpleNamespace
from typing import Any

import pynvml  # type: ignore[import-untyped]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpud.domain import Gpu, GpuProcess, GpuRequest
from gpud.gpus import (
    GpuInventory,
    GpuInventoryError,
    NoGpuInventory,
    NvidiaDriverNotFound,
    NvmlInventory,
    aliases_for_type,
    normalize_name,
)
from gpud.inventory import open_inventory
from gpud.testing import FakeGpuInventory
from gpud.testing.fake_gpus import check_fake_types, fake_uuid

TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
GIB = 1024**3


def _nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    try:
        return bool(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def _nvml_library_present() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return False
    except pynvml.NVMLError:
        return True
    pynvml.nvmlShutdown()
    return True


HAS_GPU = _nvml_works()
HAS_DRIVER = _nvml_library_present()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU/driver on this machine")
needs_no_driver = pytest.mark.skipif(HAS_DRIVER, reason="this machine has an NVIDIA driver")


# ---------------------------------------------------------------------------------------
# normalize_name

NAMES = [
    ("NVIDIA H100 80GB HBM3", "h100", ()),
    ("NVIDIA H100 PCIe", "h100", ()),
    ("NVIDIA H100 NVL", "h100", ()),
    ("NVIDIA H100", "h100", ()),
    ("NVIDIA H200", "h200", ()),
    ("NVIDIA H200 NVL", "h200", ()),
    ("NVIDIA GH200 480GB", "gh200", ()),
    ("NVIDIA GH200 144G HBM3e", "gh200", ()),
    ("NVIDIA B200", "b200", ()),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb", ("a100",)),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb", ("a100",)),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb", ("a100",)),
    ("NVIDIA A100 80GB PCIe", "a100-80gb", ("a100",)),
    ("NVIDIA A800-SXM4-80GB", "a800-80gb", ("a800",)),
    ("NVIDIA A10G", "a10g", ()),
    ("NVIDIA A10", "a10", ()),
    ("NVIDIA L4", "l4", ()),
    ("NVIDIA L40S", "l40s", ()),
    ("Tesla V100-SXM2-16GB", "v100-16gb", ("v100",)),
    ("Tesla V100-PCIE-32GB", "v100-32gb", ("v100",)),
    ("Tesla T4", "t4", ()),
    ("NVIDIA GeForce RTX 4090", "rtx4090", ()),
    ("NVIDIA GeForce RTX 3090 Ti", "rtx3090ti", ()),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", "rtx4090laptop", ()),
    ("NVIDIA GeForce GTX 1080 Ti", "gtx1080ti", ()),
    ("NVIDIA RTX A6000", "rtxa6000", ("a6000",)),
    ("NVIDIA RTX A2000 12GB", "rtxa2000-12gb", ("rtxa2000", "a2000")),
    ("NVIDIA RTX 6000 Ada Generation", "rtx6000ada", ()),
    ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "rtxpro6000", ()),
    ("Quadro RTX 8000", "rtx8000", ()),
    ("NVIDIA TITAN RTX", "titanrtx", ()),
    # Unknown names: a deterministic slug.
    ("NVIDIA Zeta 9000 Ultra", "zeta9000ultra", ()),
    ("Graphics Device", "graphicsdevice", ()),
    ("", "unknown", ()),
    ("NVIDIA ???", "unknown", ()),
]


@pytest.mark.parametrize(("name", "gpu_type", "aliases"), NAMES)
def test_normalize_name(name: str, gpu_type: str, aliases: tuple[str, ...]) -> None:
    assert normalize_name(name) == (gpu_type, aliases)
    assert TYPE_RE.match(gpu_type)


@given(st.text(max_size=60))
def test_normalize_name_always_gives_a_valid_type(name: str) -> None:
    gpu_type, aliases = normalize_name(name)
    assert TYPE_RE.match(gpu_type), gpu_type
    assert all(TYPE_RE.match(a) for a in aliases)
    assert normalize_name(name) == (gpu_type, aliases)


def test_normalized_types_are_valid_gpu_requests() -> None:
    # Whatever a GPU is called, a user can ask for it by that type.
    for name, _, _ in NAMES:
        gpu_type, _ = normalize_name(name)
        assert GpuRequest.parse(f"{gpu_type}:2") == GpuRequest(((gpu_type, 2),))


def test_aliases_for_type() -> None:
    assert aliases_for_type("a100-80gb") == ("a100",)
    assert aliases_for_type("h100") == ()
    assert aliases_for_type("rtxa6000") == ("a6000",)
    assert aliases_for_type("rtxa2000-12gb") == ("rtxa2000", "a2000")


# ---------------------------------------------------------------------------------------
# FakeGpuInventory


def test_fake_inventory_snapshot() -> None:
    inv = FakeGpuInventory(["h100", "H100", "a100-80gb", "h200", "l4"])
    assert isinstance(inv, GpuInventory)
    assert inv.source == "fake"
    assert inv.note is not None and "FAKE" in inv.note
    assert inv.driver_version() is None
    gpus = inv.snapshot()
    assert [g.index for g in gpus] == [0, 1, 2, 3, 4]
    assert [g.type for g in gpus] == ["h100", "h100", "a100-80gb", "h200", "l4"]
    assert len({g.uuid for g in gpus}) == 5
    assert gpus[0].uuid == fake_uuid(0) == "GPU-00000000-fake-4000-8000-000000000000"
    assert all(g.fake and g.utilization == 0 and not g.processes for g in gpus)
    assert all(g.name.startswith("FAKE NVIDIA ") for g in gpus)
    assert gpus[0].name == "FAKE NVIDIA H100"
    assert [g.memory_total // GIB for g in gpus] == [80, 80, 80, 141, 24]
    assert gpus[2].aliases == ("a100",)
    assert gpus[2].matches("a100") and gpus[2].matches("a100-80gb") and gpus[2].matches("any")
    assert not gpus[0].matches("a100")
    assert inv.snapshot() == gpus  # nothing changed, nothing differs


def test_fake_inventory_sized_type_memory() -> None:
    (gpu,) = FakeGpuInventory(["a100-40gb"]).snapshot()
    assert gpu.memory_total == 40 * GIB


def test_fake_inventory_processes() -> None:
    inv = FakeGpuInventory(["h100", "h100"])
    inv.set_processes(1, [GpuProcess(4242, 2 * GIB), GpuProcess(4243)])
    gpus = inv.snapshot()
    assert gpus[0].processes == ()
    assert gpus[1].processes == (GpuProcess(4242, 2 * GIB), GpuProcess(4243))
    assert gpus[1].memory_used == 2 * GIB
    assert gpus[1].foreign_pids == ()  # the daemon fills this in, not the inventory
    inv.set_processes(1, [])
    assert inv.snapshot()[1].processes == ()
    with pytest.raises(IndexError):
        inv.set_processes(2, [])
    with pytest.raises(TypeError):
        inv.set_processes(0, [4242])  # type: ignore[list-item]


def test_fake_inventory_error_and_close() -> None:
    inv = FakeGpuInventory(["h100"])
    inv.set_error("NVML went away")
    with pytest.raises(GpuInventoryError, match="NVML went away"):
        inv.snapshot()
    inv.set_error(None)
    assert len(inv.snapshot()) == 1
    inv.close()
    inv.close()
    with pytest.raises(GpuInventoryError, match="closed"):
        inv.snapshot()


def test_fake_inventory_is_thread_safe() -> None:
    inv = FakeGpuInventory(["h100"] * 4)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                for g in inv.snapshot():
                    assert g.memory_used == sum(p.used_memory or 0 for p in g.processes)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(2000):
        inv.set_processes(i % 4, [GpuProcess(p, GIB) for p in range(i % 5)])
    stop.set()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("bad", [["H 100"], ["any"], [""], ["-h100"], ["h100:2"]])
def test_fake_inventory_rejects_bad_types(bad: list[str]) -> None:
    with pytest.raises(ValueError, match="invalid fake GPU type"):
        FakeGpuInventory(bad)


def test_fake_types_must_be_a_list() -> None:
    with pytest.raises(ValueError, match="list"):
        check_fake_types("h100")


# ---------------------------------------------------------------------------------------
# NoGpuInventory and open_inventory on this (GPU-less) machine


def test_no_gpu_inventory() -> None:
    inv = NoGpuInventory(note="nothing here")
    assert isinstance(inv, GpuInventory)
    assert (inv.source, inv.note, inv.snapshot(), inv.driver_version()) == (
        "none",
        "nothing here",
        [],
        None,
    )
    inv.close()


@needs_no_driver
def test_open_inventory_without_driver_gives_fakes() -> None:
    inv = open_inventory(["h100", "a100-80gb"])
    try:
        assert isinstance(inv, FakeGpuInventory)
        assert inv.source == "fake"
        assert inv.note is not None
        assert "no NVIDIA driver" in inv.note and "FAKE" in inv.note
        assert [g.type for g in inv.snapshot()] == ["h100", "a100-80gb"]
    finally:
        inv.close()


@needs_no_driver
def test_open_inventory_without_driver_or_fakes_gives_none() -> None:
    inv = open_inventory([])
    assert isinstance(inv, NoGpuInventory)
    assert inv.snapshot() == []
    assert inv.note is not None and "fake_gpus" in inv.note


@needs_no_driver
def test_nvml_inventory_without_driver() -> None:
    with pytest.raises(NvidiaDriverNotFound):
        NvmlInventory()


def test_open_inventory_checks_fake_types_everywhere() -> None:
    with pytest.raises(ValueError, match="invalid fake GPU type"):
        open_inventory(["h100", "not a type"])


# ---------------------------------------------------------------------------------------
# NvmlInventory against a stand-in pynvml


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


class StandInNvml:
    """Just enough of pynvml for NvmlInventory, with per-call failures to inject."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.init_error: BaseException | None = None
        self.fail: dict[str, BaseException] = {}  # function name -> what it raises
        self.procs: dict[int, list[Any]] = {}
        self.inits = 0
        self.shutdowns = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def call(fname: str, result: Any) -> Any:
            def fn(*args: Any) -> Any:
                if fname in self.fail:
                    raise self.fail[fname]
                return result(*args)

            return fn

        def init() -> None:
            if self.init_error is not None:
                raise self.init_error
            self.inits += 1

        def shutdown() -> None:
            self.shutdowns += 1

        funcs: dict[str, Any] = {
            "nvmlInit": init,
            "nvmlShutdown": shutdown,
            "nvmlSystemGetDriverVersion": call("driver", lambda: "550.54.15"),
            "nvmlDeviceGetCount": call("count", lambda: len(self.names)),
            "nvmlDeviceGetHandleByIndex": call("handle", lambda i: i),
            "nvmlDeviceGetName": call("name", lambda h: self.names[h].encode()),
            "nvmlDeviceGetUUID": call("uuid", lambda h: f"GPU-{h:08d}-1111-2222-3333-444444444444"),
            "nvmlDeviceGetMemoryInfo": call(
                "memory", lambda h: SimpleNamespace(total=80 * GIB, used=GIB, free=79 * GIB)
            ),
            "nvmlDeviceGetUtilizationRates": call(
                "utilization", lambda h: SimpleNamespace(gpu=37, memory=12)
            ),
            "nvmlDeviceGetTemperature": call("temperature", lambda h, sensor: 41),
            "nvmlDeviceGetPowerUsage": call("power", lambda h: 123456),
            "nvmlDeviceGetEnforcedPowerLimit": call("limit", lambda h: 700000),
            "nvmlDeviceGetComputeRunningProcesses": call(
                "processes", lambda h: self.procs.get(h, [])
            ),
            "nvmlDeviceGetComputeRunningProcesses_v2": call(
                "processes_v2", lambda h: self.procs.get(h, [])
            ),
        }
        for name, fn in funcs.items():
            monkeypatch.setattr(pynvml, name, fn)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> StandInNvml:
    stand_in = StandInNvml(["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"])
    stand_in.install(monkeypatch)
    return stand_in


def test_nvml_snapshot(nvml: StandInNvml) -> None:
    nvml.procs[1] = [
        SimpleNamespace(pid=777, usedGpuMemory=3 * GIB),
        SimpleNamespace(pid=778, usedGpuMemory=None),
    ]
    inv = NvmlInventory()
    assert isinstance(inv, GpuInventory)
    assert inv.source == "nvml" and inv.note is None
    assert inv.driver_version() == "550.54.15"
    gpus = inv.snapshot()
    assert gpus[0] == Gpu(
        index=0,
        uuid="GPU-00000000-1111-2222-3333-444444444444",
        name="NVIDIA H100 80GB HBM3",
        type="h100",
        aliases=(),
        memory_total=80 * GIB,
        memory_used=GIB,
        utilization=37,
        memory_utilization=12,
        temperature=41,
        power_w=123.456,
        power_limit_w=700.0,
        processes=(),
        fake=False,
    )
    assert (gpus[1].type, gpus[1].aliases) == ("a100-40gb", ("a100",))
    assert gpus[1].processes == (GpuProcess(777, 3 * GIB), GpuProcess(778, None))
    assert gpus[1].foreign_pids == ()
    inv.close()
    inv.close()
    assert (nvml.inits, nvml.shutdowns) == (1, 1)
    with pytest.raises(GpuInventoryError, match="closed"):
        inv.snapshot()


@pytest.mark.parametrize("field", ["memory", "utilization", "temperature", "power", "limit"])
def test_nvml_unsupported_reading_is_none(nvml: StandInNvml, field: str) -> None:
    nvml.fail[field] = _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
    inv = NvmlInventory()
    gpu = inv.snapshot()[0]
    got = {
        "memory": (gpu.memory_total, gpu.memory_used),
        "utilization": (gpu.utilization, gpu.memory_utilization),
        "temperature": gpu.temperature,
        "power": gpu.power_w,
        "limit": gpu.power_limit_w,
    }[field]
    assert got in (None, (None, None), (0, 0))
    assert gpu.uuid and gpu.type == "h100"
    assert inv.note is None
    inv.close()


def test_nvml_unsupported_processes_warns(nvml: StandInNvml) -> None:
    nvml.fail["processes"] = _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
    inv = NvmlInventory(note="base note")
    assert all(g.processes == () for g in inv.snapshot())
    assert inv.note is not None
    assert inv.note.startswith("base note; GPU 0 does not report its processes")
    del nvml.fail["processes"]
    inv.snapshot()
    assert inv.note == "base note"  # the warning goes once it no longer holds
    inv.close()


def test_nvml_old_driver_falls_back_to_v2_processes(nvml: StandInNvml) -> None:
    nvml.fail["processes"] = pynvml.NVMLLibraryMismatchError("old driver")
    nvml.procs[0] = [SimpleNamespace(pid=55, usedGpuMemory=GIB)]
    inv = NvmlInventory()
    assert inv.snapshot()[0].processes == (GpuProcess(55, GIB),)
    inv.close()


@pytest.mark.parametrize(
    ("field", "code"),
    [
        ("temperature", pynvml.NVML_ERROR_GPU_IS_LOST),
        ("processes", pynvml.NVML_ERROR_UNKNOWN),
        ("uuid", pynvml.NVML_ERROR_NOT_SUPPORTED),
        ("count", pynvml.NVML_ERROR_UNKNOWN),
    ],
)
def test_nvml_read_failure_fails_the_snapshot(nvml: StandInNvml, field: str, code: int) -> None:
    inv = NvmlInventory()
    nvml.fail[field] = _err(code)
    with pytest.raises(GpuInventoryError, match="nvidia-smi") as info:
        inv.snapshot()
    assert type(_err(code)).__name__ in str(info.value)
    inv.close()


def test_open_inventory_prefers_real_gpus_over_fakes(nvml: StandInNvml) -> None:
    inv = open_inventory(["h100", "h100", "h100"])
    assert isinstance(inv, NvmlInventory)
    assert inv.note is not None and "fake_gpus in the config is ignored" in inv.note
    assert [g.type for g in inv.snapshot()] == ["h100", "a100-40gb"]
    inv.close()
    assert open_inventory([]).note is None


def test_open_inventory_driver_without_gpus(nvml: StandInNvml) -> None:
    nvml.names = []
    inv = open_inventory(["h100"])  # never fakes on a box with a driver
    assert isinstance(inv, NoGpuInventory)
    assert inv.driver_version() == "550.54.15"
    assert inv.note is not None
    assert "reports no GPUs" in inv.note and "fake_gpus in the config is ignored" in inv.note
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


@pytest.mark.parametrize(
    "code", [pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH]
)
def test_open_inventory_broken_driver_is_an_error(nvml: StandInNvml, code: int) -> None:
    nvml.init_error = _err(code)
    with pytest.raises(GpuInventoryError, match="nvidia-smi") as info:
        open_inventory(["h100"])  # fakes do not paper over a broken driver
    assert not isinstance(info.value, NvidiaDriverNotFound)
    assert type(_err(code)).__name__ in str(info.value)


def test_open_inventory_count_failure_closes_nvml(nvml: StandInNvml) -> None:
    nvml.fail["count"] = _err(pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(GpuInventoryError):
        open_inventory([])
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_open_inventory_library_missing(nvml: StandInNvml) -> None:
    nvml.init_error = _err(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert isinstance(open_inventory(["t4"]), FakeGpuInventory)
    assert isinstance(open_inventory([]), NoGpuInventory)


# ---------------------------------------------------------------------------------------
# The real thing


@pytest.mark.gpu
@needs_gpu
def test_real_nvml_inventory() -> None:
    inv = open_inventory(["h100"])
    try:
        assert isinstance(inv, NvmlInventory)
        assert inv.driver_version()
        gpus = inv.snapshot()
        assert gpus
        for i, g in enumerate(gpus):
            assert g.index == i
            assert g.uuid.startswith(("GPU-", "MIG-"))
            assert TYPE_RE.match(g.type)
            assert normalize_name(g.name) == (g.type, g.aliases)
            assert not g.fake
            assert g.memory_total == 0 or 0 <= g.memory_used <= g.memory_total
            assert g.utilization is None or 0 <= g.utilization <= 100
            assert all(p.pid > 0 for p in g.processes)
        assert len({g.uuid for g in gpus}) == len(gpus)
        assert [g.uuid for g in inv.snapshot()] == [g.uuid for g in gpus]
    finally:
        inv.close()


@pytest.mark.gpu
@needs_gpu
def test_real_nvml_snapshot_from_threads() -> None:
    inv = NvmlInventory()
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(len(inv.snapshot()))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    inv.close()
    assert len(results) == 4 and len(set(results)) == 1
