"""This process's resident memory on Linux: now, its high-water mark, and handing freed heap back.

Used to measure one task's peak memory on CPU: release_free_heap(), reset_peak_rss(), note
rss_bytes(), run, then peak_rss_bytes() minus that base (approximate: allocator caching and
fragmentation count too)."""

from __future__ import annotations

import ctypes
import gc
import os
import resource


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark from the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The high-water mark since the last reset_peak_rss (else since the process started)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # since process start


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so one task's RSS does not carry into the next."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
