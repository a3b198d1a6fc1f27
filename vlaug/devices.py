"""Devices and precision, without importing open_clip (so that stages 2 and 3 stay light)."""

from __future__ import annotations

import contextlib
import functools

import torch

from vlaug.choices import PRECISIONS
from vlaug.errors import UsageError


# Below this many multiply-adds (or values touched) per step, a CPU problem is too small to
# share between threads: one thread is faster, and far faster on a busy machine, where each
# operator waits for the other threads.
SMALL_PROBLEM = 2**25


@contextlib.contextmanager
def num_threads(n: int):
    """Run the block with ``n`` intra-op threads (torch.set_num_threads), then restore them."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_for(work: float, device: torch.device | str = "cpu", threads: int | None = None):
    """A context with one intra-op thread when ``work`` (multiply-adds per step) is below
    :data:`SMALL_PROBLEM` on the CPU; else with ``threads`` (default: those torch has)."""
    if torch.device(device).type == "cpu" and work < SMALL_PROBLEM:
        return num_threads(1)
    return num_threads(threads or torch.get_num_threads())


def release_memory() -> None:
    """Hand the C allocator's free pages back to the system (glibc's malloc_trim; a no-op
    elsewhere). Large temporaries freed by torch and Arrow otherwise stay in the process's
    resident memory, and on a cache held near --memory-budget they add up across fits."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, looked up once; None where there is none."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def resolve_device(device: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an unavailable device is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine. Use --device auto or cpu.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available on this machine. Use --device auto or cpu.")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps.") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on GPUs that support it (else fp16), fp32 on CPU."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise UsageError(f"--precision {precision!r}; use auto, fp32, bf16 or fp16.")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
