"""Training precision: where `amp` trains in bf16 or fp16, and the autocast context for it.

On CUDA: bf16 where the GPU supports it, else fp16 (with a gradient scaler, train.py). On a CPU:
bf16 only where it is native (AVX512-BF16 or AMX), where oneDNN runs the image tower's
convolutions faster in it; elsewhere bf16 would be emulated, and slower than float32. The text
GRU stays float32 on a CPU (autocast_dtype), the μ/σ heads everywhere (encoders/model/networks.py
says why).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX, as Linux reports them):
    there autocast trains its convolutions and matrix products faster; elsewhere bf16 would be
    emulated, and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def autocast_dtype(device: torch.device, enabled: bool,
                   tower: str = "image") -> torch.dtype | None:
    """The lower precision `amp` trains `tower` in: on CUDA bf16 where supported, else fp16; on
    a CPU bf16 where it is native (cpu_native_bf16), for the image tower only (the text GRU was
    no faster in bf16 there, and its oneDNN kernels grew the process every step as caption
    lengths vary); None = float32."""
    if not enabled or (device.type == "cpu" and tower == "text"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_native_bf16() else None


def autocast(device: torch.device, enabled: bool, tower: str = "image"):
    """The autocast context of autocast_dtype (a disabled one for float32)."""
    dtype = autocast_dtype(device, enabled, tower)
    if dtype is None:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(device.type, dtype=dtype)
