"""Test doubles for gpud, usable from tests and from a daemon on a machine without GPUs."""

from gpud.testing.clock import FakeClock
from gpud.testing.fake_gpus import FakeGpuInventory

__all__ = ["FakeClock", "FakeGpuInventory"]
