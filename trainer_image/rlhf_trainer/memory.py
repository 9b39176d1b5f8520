"""Peak memory of this process over a span of code: device memory on GPU, resident memory on CPU.

    probe = PeakMemory()
    probe.reset(); ...; probe.peak_bytes()

On a GPU, `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` (tensor memory of
this process on its device; the allocator's cache on top of it is not counted). On CPU, the
resident-set high-water mark `VmHWM` of /proc/self/status, which writing "5" to
/proc/self/clear_refs resets (Linux >= 4.0); where that write is refused the mark only grows, so
a phase reports the peak since the process started (`resettable` says which).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
CLEAR_PEAK_RSS = "5"  # proc(5): "5" resets the peak resident set size (VmHWM) to the current RSS


def parse_vm_hwm(status: str) -> int:
    """Bytes of `VmHWM:   1234 kB` in a /proc/<pid>/status text; ValueError when the line is missing."""
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.MULTILINE)
    if match is None:
        raise ValueError("no VmHWM line in /proc/self/status")
    return int(match.group(1)) * 1024


def _cuda():
    torch = sys.modules.get("torch")  # only a process that uses torch can have device memory
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


class PeakMemory:
    """reset() then peak_bytes(): the highest memory use of this process in between."""

    def __init__(self):
        self.resettable = True

    @property
    def kind(self) -> str:
        return "device" if _cuda() else "rss"

    def reset(self) -> None:
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
            return
        try:
            PROC_CLEAR_REFS.write_text(CLEAR_PEAK_RSS)
        except OSError:
            self.resettable = False

    def peak_bytes(self) -> int:
        """Peak since the last reset (0 where the platform has no /proc)."""
        cuda = _cuda()
        if cuda is not None:
            return int(cuda.max_memory_allocated())
        try:
            return parse_vm_hwm(PROC_STATUS.read_text())
        except (OSError, ValueError):
            return 0
