"""glibc's malloc, set to keep freed memory for reuse: what streamed evaluation on CPU needs to run at full speed.

glibc returns freed blocks above its trim threshold to the system and serves large requests by ``mmap``; both
thresholds adapt as the process runs. Eager evaluation allocates and frees several 4 MiB tensors per chunk, and
until (and sometimes long after) the thresholds settle, each chunk's temporaries are mapped and zero-filled anew:
~100,000+ page faults per 100-image call. Measured (docs/performance.md): eager log p(x) at k = 5000 took 15.9-29.9
ms per image with +20-291 MiB as it came, 14.0-14.8 ms with +22-23 MiB after :func:`keep_freed_memory`.
"""

from __future__ import annotations

import ctypes
import functools
import os

# mallopt parameter numbers (malloc.h) and values, by the environment variable that sets the same from outside.
MALLOPT = {"MALLOC_TRIM_THRESHOLD_": (-1, 256 << 20), "MALLOC_MMAP_THRESHOLD_": (-3, 32 << 20)}


@functools.cache
def keep_freed_memory() -> tuple[str, ...]:
    """Set glibc's trim threshold to 256 MiB and its mmap threshold to 32 MiB in this process, once.

    Settings the environment already makes (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``) are left alone:
    that is how to opt out. The cost is up to 256 MiB of freed memory kept for reuse instead of returned.
    A process-wide setting, so the library never makes it on its own: the caller opts in (the ``vaelab`` command
    line does at start, and so do the benchmarks), for the streamed estimators' sake (:func:`vaelab.log_marginal`,
    ``posterior_gap``), whose allocation pattern needs it (training's does not, measured).

    Returns:
        The names of the settings applied; empty where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not Linux, or not glibc
        return ()
    return tuple(
        name for name, (param, value) in MALLOPT.items() if name not in os.environ and mallopt(param, value) == 1
    )
