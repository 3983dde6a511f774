"""The `resources` snapshot: GPUs through NVML when present, CPU/RAM/process always."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from llmws_core.engine import resources


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch):
    """A machine where `import pynvml` fails (no nvidia-ml-py), with the cached probe reset."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    resources._nvml.cache_clear()
    yield
    resources._nvml.cache_clear()


def test_snapshot_without_nvml_has_no_gpus_and_everything_else(no_nvml: None) -> None:
    """Without NVML the report says gpus: [] and still has CPU, RAM, process and model."""
    snap = resources.snapshot({"name": "m.gguf", "backend": "llamacpp"})
    assert snap["gpus"] == []
    assert set(snap) == {"gpus", "cpu", "ram", "process", "model"}
    assert snap["cpu"]["count"] >= 1 and 0 <= snap["cpu"]["percent"] <= 100
    assert 0 < snap["ram"]["available_mb"] <= snap["ram"]["total_mb"]
    assert snap["process"]["pid"] == os.getpid() and snap["process"]["rss_mb"] > 0
    assert snap["process"]["threads"] >= 1
    assert snap["model"] == {"name": "m.gguf", "backend": "llamacpp"}
    json.dumps(snap)
    assert resources.nvml_free_bytes(0) is None


def test_snapshot_on_this_machine_is_cheap_and_well_formed() -> None:
    """Whatever the machine has, a snapshot is JSON, takes milliseconds, and GPUs carry their fields."""
    resources.snapshot()
    start = time.perf_counter()
    for _ in range(10):
        snap = resources.snapshot()
    assert (time.perf_counter() - start) / 10 < 0.2
    json.dumps(snap)
    for gpu in snap["gpus"]:
        assert {"index", "name", "memory_total_mb", "memory_used_mb", "memory_free_mb"} <= set(gpu)
        assert 0 <= gpu["memory_free_mb"] <= gpu["memory_total_mb"]
        assert {"utilization_pct", "temperature_c", "power_w"} <= set(gpu)


def test_snapshot_never_imports_torch(no_nvml: None) -> None:
    """Asking for resources must not import torch (seconds and hundreds of MB) as a side effect."""
    had_torch = "torch" in sys.modules
    resources.snapshot()
    assert ("torch" in sys.modules) == had_torch
