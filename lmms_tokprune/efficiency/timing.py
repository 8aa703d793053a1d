"""Wall-clock measurement that is honest on both devices: CUDA events on a GPU, perf_counter on a CPU."""

from __future__ import annotations

import resource
import sys
import time
from typing import List, Optional

import torch


class StepClock:
    """Marks points in time on `device`; elapsed times between marks in milliseconds.

    On CUDA the marks are events recorded on the current stream (no host sync per mark); reading
    the result synchronises once. On CPU the marks are perf_counter readings.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._marks: List[object] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def __len__(self) -> int:
        return len(self._marks)

    def elapsed_ms(self, start: int = 0, end: int = -1) -> float:
        a, b = self._marks[start], self._marks[end]
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return float(a.elapsed_time(b))  # type: ignore[union-attr]
        return (float(b) - float(a)) * 1000.0  # type: ignore[arg-type]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> Optional[float]:
    """Peak GPU memory allocated since the last reset, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


class StepTimer:
    """A generate() logits processor that marks the clock at every decoding step.

    generate() calls logits processors once per step, right after the forward pass, so the first
    mark ends the prefill (time to first token) and the gaps between marks are per-token decode times.
    """

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.clock.mark()
        return scores
