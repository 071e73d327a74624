"""Which device a run uses. With several GPUs visible, `device=auto` takes one that no other sadr job on this
machine holds: a lock per GPU under `<cache_dir>/gpus`, held until the process exits (an OS lock, so a job that
crashes releases its GPU). Parallel jobs of a sweep (`hydra/launcher=gpus`) therefore never share a card.
"""
from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from sadr.errors import InvalidSettingError

log = logging.getLogger(__name__)

_HELD: dict[Path, tuple[int, FileLock]] = {}  # lock folder -> the GPU this process holds there, and its lock


def claim_free_gpu(lock_dir: Path, count: int, poll_seconds: float = 5.0) -> int:
    """The index of a GPU among `count` that no other process holds, waiting until one is free."""
    lock_dir = Path(lock_dir)
    if lock_dir in _HELD:
        return _HELD[lock_dir][0]
    lock_dir.mkdir(parents=True, exist_ok=True)
    waiting_logged = False
    while True:
        for index in range(count):
            lock = FileLock(str(lock_dir / f"cuda{index}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            _HELD[lock_dir] = (index, lock)
            log.info("using cuda:%d (the first of %d GPUs that no other sadr job holds)", index, count)
            return index
        if not waiting_logged:
            log.info("all %d GPUs are held by other sadr jobs; waiting for one", count)
            waiting_logged = True
        time.sleep(poll_seconds)


def resolve_device(name: str, lock_dir: Path) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        return torch.device("cuda", claim_free_gpu(lock_dir, count)) if count > 1 else torch.device("cuda")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidSettingError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidSettingError(f"device={name!r} but MPS (Apple's GPU) is not available here; use device=cpu or "
                                  "device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidSettingError(f"device={name!r} but this process sees {torch.cuda.device_count()} GPU(s) "
                                  "(CUDA_VISIBLE_DEVICES numbers them from 0); use device=cuda or device=auto")
    return device


def set_tf32(device: torch.device, enabled: bool) -> bool:
    """Make float32 matrix products on `device` run in TensorFloat-32 (`enabled`) or in full float32, and return whether
    they now use TF32. Process-wide, so every run sets it from its own config. CUDA only: elsewhere it changes nothing
    and `enabled` is refused with a warning."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"
        return enabled
    if enabled:
        log.warning("tf32=true has no effect on %s (TensorFloat-32 is a CUDA setting); products stay float32", device)
    return False


def tf32_in_use(device: torch.device) -> bool:
    """Whether float32 matrix products on `device` run in TensorFloat-32 now."""
    return device.type == "cuda" and torch.backends.cuda.matmul.fp32_precision == "tf32"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def take_peak_memory(device: torch.device) -> dict:
    """{"cuda_peak_bytes": the most GPU memory torch allocated since the last call (or reset)}, then a reset;
    {} off CUDA."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return {"cuda_peak_bytes": peak}


class PhasePeaks:
    """The GPU memory peaks of consecutive phases (a group's editing, then its evaluating; a run's one-off work before
    its first group), each read when the phase ends, so it runs from the end of the phase before (or the last reset).
    Nothing off CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, int] = {}

    def end(self, phase: str) -> None:
        peak = take_peak_memory(self.device).get("cuda_peak_bytes")
        if peak is not None:
            self.phases[phase] = peak

    def described(self, phase: str) -> str:
        """", GPU peak 12.3 GB" for a phase read on CUDA, for a log line; "" otherwise."""
        return f", GPU peak {self.phases[phase] / 1e9:.1f} GB" if phase in self.phases else ""

    def fields(self) -> dict:
        """What a case row records: `cuda_peak_bytes`, the group's peak, and `cuda_phase_peak_bytes`, each phase's."""
        if not self.phases:
            return {}
        return {"cuda_peak_bytes": max(self.phases.values()), "cuda_phase_peak_bytes": dict(self.phases)}


def release_unused_memory() -> None:
    """Collect what nothing references any more and hand the GPU memory torch keeps cached back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def clock(device: torch.device) -> float:
    """`time.perf_counter()` once the device's queued work is done (CUDA runs asynchronously), for timing a phase."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
