"""Process accounting for the benchmarks: resident memory, its peak, CPU time (Linux /proc).

Imported by the scripts beside it (`python3 benchmarks/x.py` puts this folder on sys.path).
"""

from __future__ import annotations

import os
from pathlib import Path


def vm_kib(field: str, pid: int | str = "self") -> int:
    """A VmXXX line of /proc/PID/status (VmRSS, VmHWM = peak RSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"no {field} in /proc/{pid}/status")


def vm_mib(field: str, pid: int | str = "self") -> float:
    return round(vm_kib(field, pid) / 1024, 1)


def reset_peak_rss(pid: int | str = "self") -> None:
    """Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
