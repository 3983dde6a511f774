"""What the machine has and uses: GPUs through NVML, CPU, RAM and this process (psutil).

Cheap enough to call on every `get_resources` and from a status poll: NVML is
initialised once and kept, CPU percentages are read without sleeping (psutil's
`interval=None` compares with the previous call). A machine without an NVIDIA
driver or without `nvidia-ml-py` simply has no GPUs; nothing here raises for it.
torch is consulted only if something else already imported it -- importing torch
just to ask would cost seconds and hundreds of MB.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from typing import Any

import psutil

logger = logging.getLogger("llmws.engine.resources")

MiB = 1024 * 1024

_nvml_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _nvml() -> Any | None:
    """The initialised `pynvml` module, or None without the package or a driver (asked once)."""
    try:
        import pynvml
    except ImportError:
        logger.info("nvidia-ml-py is not installed; GPU statistics are off")
        return None
    try:
        with _nvml_lock:
            pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        logger.info("NVML is not available (%s); GPU statistics are off", exc)
        return None
    return pynvml


def _mb(n_bytes: int | float) -> float:
    return round(n_bytes / MiB, 1)


def _optional(call: Any, *args: Any) -> Any:
    """An NVML query that some GPUs do not support (power on laptops, ...): None if it fails."""
    try:
        return call(*args)
    except Exception:
        return None


def _torch_cuda() -> Any | None:
    """`torch.cuda` if torch is already imported and CUDA is initialised; never imports torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda
    except Exception:
        return None
    return None


def _torch_index_by_uuid(cuda: Any) -> dict[str, int]:
    """NVML UUID ("GPU-...") -> torch device index, since CUDA_VISIBLE_DEVICES may renumber them."""
    mapping: dict[str, int] = {}
    try:
        for i in range(cuda.device_count()):
            uuid = str(cuda.get_device_properties(i).uuid)
            mapping[uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"] = i
    except Exception:
        return {}
    return mapping


def _gpu(nvml: Any, index: int, cuda: Any | None, torch_index: dict[str, int]) -> dict[str, Any]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = nvml.nvmlDeviceGetName(handle)
    if isinstance(name, bytes):  # older nvidia-ml-py returned bytes
        name = name.decode(errors="replace")
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    util = _optional(nvml.nvmlDeviceGetUtilizationRates, handle)
    temp = _optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
    power_mw = _optional(nvml.nvmlDeviceGetPowerUsage, handle)
    gpu: dict[str, Any] = {
        "index": index,
        "name": name,
        "memory_total_mb": _mb(mem.total),
        "memory_used_mb": _mb(mem.used),
        "memory_free_mb": _mb(mem.free),
        "utilization_pct": util.gpu if util is not None else None,
        "temperature_c": temp,
        "power_w": round(power_mw / 1000, 1) if power_mw is not None else None,
    }
    if cuda is not None:
        uuid = _optional(nvml.nvmlDeviceGetUUID, handle)
        if isinstance(uuid, bytes):
            uuid = uuid.decode(errors="replace")
        t_index = torch_index.get(uuid) if uuid else None
        if t_index is None and not torch_index and "CUDA_VISIBLE_DEVICES" not in os.environ:
            t_index = index  # no UUIDs to match, but nothing renumbers devices either
        if t_index is not None:
            allocated = _optional(cuda.memory_allocated, t_index)
            reserved = _optional(cuda.memory_reserved, t_index)
            if allocated is not None:
                gpu["torch_allocated_mb"] = _mb(allocated)
            if reserved is not None:
                gpu["torch_reserved_mb"] = _mb(reserved)
    return gpu


def gpus() -> list[dict[str, Any]]:
    """One dict per NVIDIA GPU; [] without NVML or GPUs."""
    nvml = _nvml()
    if nvml is None:
        return []
    cuda = _torch_cuda()
    torch_index = _torch_index_by_uuid(cuda) if cuda is not None else {}
    result = []
    try:
        count = nvml.nvmlDeviceGetCount()
    except Exception as exc:
        logger.warning("NVML could not count GPUs: %s", exc)
        return []
    for index in range(count):
        try:
            result.append(_gpu(nvml, index, cuda, torch_index))
        except Exception as exc:  # a GPU fallen off the bus must not break the whole report
            logger.warning("NVML could not read GPU %d: %s", index, exc)
    return result


def nvml_free_bytes(index: int = 0) -> int | None:
    """Free memory of GPU `index` in bytes, as NVML sees it; None without NVML or that GPU."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        return int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index)).free)
    except Exception:
        return None


def torch_free_bytes(index: int = 0) -> int | None:
    """Free memory of CUDA device `index` through torch, only if torch is already loaded."""
    cuda = _torch_cuda()
    if cuda is None:
        return None
    try:
        free, _total = cuda.mem_get_info(index)
        return int(free)
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def _process() -> psutil.Process:
    # One Process object, so its cpu_percent(interval=None) compares with the previous call.
    return psutil.Process()


def snapshot(model: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `resources` event body: GPUs, CPU, RAM, this process, and the loaded `model` as given."""
    vm = psutil.virtual_memory()
    proc = _process()
    try:
        with proc.oneshot():
            rss = proc.memory_info().rss
            threads = proc.num_threads()
    except psutil.Error:
        rss, threads = 0, 0
    return {
        "gpus": gpus(),
        "cpu": {"percent": psutil.cpu_percent(interval=None), "count": psutil.cpu_count()},
        "ram": {
            "total_mb": _mb(vm.total),
            "available_mb": _mb(vm.available),
            "used_mb": _mb(vm.used),
            "percent": vm.percent,
        },
        "process": {"rss_mb": _mb(rss), "pid": os.getpid(), "threads": threads},
        "model": model,
    }
