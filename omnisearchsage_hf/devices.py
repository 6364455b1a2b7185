"""Which device kind torch sees: decides whether Accelerate is told a run is a CPU run.

Accelerate only starts gloo multi-process runs (``accelerate launch --multi_gpu --num_processes 2`` on a
machine without GPUs) when the ``Accelerator`` or ``PartialState`` is built with ``cpu=True``; without
it every process believes it is alone. The trainer and batch inference both ask this one function.
"""

from __future__ import annotations

import torch


def has_accelerator() -> bool:
    """Whether torch sees a CUDA, MPS or XPU device."""
    return (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
    )


__all__ = ["has_accelerator"]
