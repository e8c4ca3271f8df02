"""Where a worker serves: `auto` follows the GPU the pod was given; impossible choices are errors."""

from __future__ import annotations

import pytest

from helios_worker.placement import DevicePlacement, PlacementError, resolve_placement


@pytest.mark.parametrize(
    ("device", "dtype", "gpus", "expected"),
    [
        ("auto", "auto", 1, DevicePlacement("cuda", "bfloat16")),
        ("auto", "auto", 0, DevicePlacement("cpu", "float32")),
        ("auto", "float16", 2, DevicePlacement("cuda", "float16")),
        ("cpu", "auto", 4, DevicePlacement("cpu", "float32")),
        ("cuda:1", "auto", 2, DevicePlacement("cuda:1", "bfloat16")),
    ],
)
def test_auto_serves_on_the_visible_gpu_in_bfloat16_else_cpu_in_float32(
    device: str, dtype: str, gpus: int, expected: DevicePlacement
) -> None:
    assert resolve_placement(device, dtype, cuda_devices=gpus) == expected


@pytest.mark.parametrize(
    ("device", "dtype", "gpus", "message"),
    [
        ("cuda", "auto", 0, "CUDA is not available"),
        ("cuda:2", "auto", 2, "only 2 CUDA device"),
        ("tpu", "auto", 0, "expected auto, cpu or cuda"),
        ("cuda:x", "auto", 1, "expected auto, cpu or cuda"),
        ("auto", "int8", 1, "--dtype int8"),
    ],
)
def test_a_device_or_dtype_that_cannot_work_is_an_error(device: str, dtype: str, gpus: int, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        resolve_placement(device, dtype, cuda_devices=gpus)
