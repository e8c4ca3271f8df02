"""What the bench runs on: the device's name, its copy bandwidth (measured here), energy and memory."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # cpu | cuda
    name: str
    torch_version: str
    transformers_version: str
    python_version: str
    cuda_version: str | None
    cores: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(option: str) -> str:
    """auto -> cuda when a GPU is visible, else cpu; cuda without a GPU is an error, not a silent CPU run."""
    if option == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if option == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    if option not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {option!r}")
    return option


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_info(device: str) -> DeviceInfo:
    import transformers

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        cuda_version = torch.version.cuda
    else:
        name = f"{_cpu_name()} ({platform.system()} {platform.machine()})"
        cuda_version = None
    return DeviceInfo(
        kind=device,
        name=name,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        python_version=sys.version.split()[0],
        cuda_version=cuda_version,
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
    )


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_copy_bandwidth(device: str, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written.

    The median of `repeats` timed copies after one warm-up copy; the buffer is random (never zeros)
    and should be several times the last-level cache so the copy measures memory, not cache.
    """
    n = max(nbytes // 4, 1)
    src = torch.rand(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    times: list[float] = []
    for _ in range(repeats):
        if device == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    if not torch.equal(dst, src):  # the copy must really have happened
        raise RuntimeError("bandwidth probe: the copy did not reproduce its source")
    seconds = statistics.median(times)
    return 2.0 * n * 4 / seconds


class EnergyMeter:
    """Joules from NVML's total-energy counter (millijoules since driver load) around a region.

    Where there is no CUDA device or NVML cannot read the counter, `available` is False and
    `reason` says why; the bench then reports energy as unavailable rather than estimating it.
    """

    def __init__(self, device: str) -> None:
        self.available = False
        self.reason = ""
        self._handle: Any = None
        self._nvml: Any = None
        if device != "cuda":
            self.reason = "no CUDA device: NVML's energy counter exists only on NVIDIA GPUs"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self._nvml = pynvml
            self.available = True
        except Exception as err:  # NVML missing, not supported on this GPU, or no permission
            self.reason = f"NVML energy counter unreadable: {err}"

    def read_joules(self) -> float | None:
        if not self.available:
            return None
        return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) / 1000.0


class PeakMemory:
    """Peak bytes the device allocator held during a region (CUDA only; None on CPU)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = int(torch.cuda.max_memory_allocated())


def free_device_memory(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
