"""Device kernel times of a step, from torch's profiler: what the tuner's
"kernels" objective, the benchmark's per-stage rows and
benchmarks/stage_times.py all read (host work and launch gaps left out)."""
from __future__ import annotations

from typing import Callable


def kernel_events(step: Callable[[], None], calls: int, warmup: int = 1) -> list:
    """[(kernel name, device microseconds)] of every CUDA kernel that
    `calls` calls of `step` ran, after `warmup` calls outside the record."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("kernel times need a CUDA device (the profiler's device kernels)")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
            if getattr(e, "device_type", None) == DeviceType.CUDA]
