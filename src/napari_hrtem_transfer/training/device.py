"""Device and precision selection."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from ..errors import ConfigError


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True if this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16; Linux only)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.mkldnn.is_available()


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``"auto"`` (CUDA, then MPS, then CPU) or an explicit name into a device.

    Raises
    ------
    ConfigError
        If the requested device is not available.
    """
    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {spec!r} requested but CUDA is not available; use 'cpu' or 'auto'.",
                "device",
            )
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present.",
                "device",
            )
        return dev
    if spec == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(
                "device 'mps' requested but MPS is not available; use 'cpu' or 'auto'.", "device"
            )
        return torch.device("mps")
    if spec == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps.", "device")


def resolve_precision(spec: str, device: torch.device) -> str:
    """The precision actually used: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    ``"auto"`` picks bf16 on CUDA GPUs that support it and on CPUs with native bf16, fp16 on
    older CUDA GPUs, and fp32 elsewhere (MPS, older CPUs).

    Raises
    ------
    ConfigError
        If fp16 is requested on a CPU (not supported for training there).
    """
    if spec == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_has_native_bf16() else "fp32"
        return "fp32"
    if spec == "fp16" and device.type == "cpu":
        raise ConfigError(
            "precision 'fp16' is not supported on the CPU; use 'bf16' or 'fp32'.", "precision"
        )
    return spec


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def torch_settings(num_threads: int | None = None, deterministic: bool = False) -> Iterator[None]:
    """Temporarily set the number of CPU threads and deterministic mode, then restore them.

    Deterministic mode uses deterministic algorithms only (``torch.use_deterministic_algorithms``
    with warnings for operations that have none), turns off cuDNN autotuning and selects
    deterministic cuDNN kernels; for CUDA it also sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
    unless already set (cuBLAS reads it when its first handle is created, so set it in the
    environment to be sure).  On a CPU, runs with the same config, data, thread count and
    machine are then bitwise identical.
    """
    import os

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_bench = torch.backends.cudnn.benchmark
    old_cudnn_det = torch.backends.cudnn.deterministic
    try:
        if num_threads:
            torch.set_num_threads(int(num_threads))
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.backends.cudnn.benchmark = old_bench
        torch.backends.cudnn.deterministic = old_cudnn_det
