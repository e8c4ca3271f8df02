"""Where a worker runs: the accelerator its pod was given, in the dtype that accelerator serves best.

A worker in a GPU pod that quietly decodes on the CPU in float32 is the worst failure a platform team
can meet, so `auto` (the default) picks CUDA and bfloat16 whenever a GPU is visible and the CPU and
float32 otherwise; an explicit choice that cannot work is an error, never a silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"
DTYPES = ("float32", "bfloat16", "float16")
ENV_DEVICE = "HELIOS_DEVICE"
ENV_DTYPE = "HELIOS_DTYPE"


class PlacementError(ValueError):
    """A device or dtype this machine cannot serve on."""


@dataclass(frozen=True)
class DevicePlacement:
    device: str  # cpu, cuda, cuda:N
    dtype: str  # one of DTYPES


def check_request(device: str, dtype: str) -> None:
    """Cheap syntax check, before torch loads. Raises PlacementError."""
    if not (device in (AUTO, "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise PlacementError(f"--device {device}: expected auto, cpu or cuda[:N]")
    if dtype != AUTO and dtype not in DTYPES:
        raise PlacementError(f"--dtype {dtype}: expected auto or one of {', '.join(DTYPES)}")


def resolve_placement(device: str, dtype: str, cuda_devices: int) -> DevicePlacement:
    """The concrete device and dtype for the requested ones, given how many CUDA devices are visible."""
    check_request(device, dtype)
    chosen = ("cuda" if cuda_devices > 0 else "cpu") if device == AUTO else device
    if chosen.startswith("cuda"):
        index = int(chosen.split(":", 1)[1]) if ":" in chosen else 0
        if cuda_devices == 0:
            raise PlacementError(f"--device {device}: CUDA is not available here (no GPU visible)")
        if index >= cuda_devices:
            raise PlacementError(f"--device {device}: only {cuda_devices} CUDA device(s) visible")
    if dtype == AUTO:
        dtype = "bfloat16" if chosen.startswith("cuda") else "float32"
    return DevicePlacement(device=chosen, dtype=dtype)
