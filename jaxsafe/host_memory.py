"""Keep freed host memory mapped, so that each call of a compiled program reuses its pages.

XLA:CPU gives each call of a program one block for all its temporaries (the "preallocated
temp" of its buffer assignment) and frees it when the call returns. glibc's malloc serves a
block above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and returns it with
``munmap``, so every call of a program with more temporaries than that page-faults them in
again, and the kernel zeroes each page. The grokking MLP's float64 StableMax step (37.6 MB of
temporaries) spent about a third of each call there, and lost it inside a ``lax.scan``, where
one block serves all the steps (docs/benchmarks.md, "Freed host memory").

:func:`retain` turns glibc's mmap path off (``M_MMAP_MAX = 0``) and the trimming of the heap's
top off (``M_TRIM_THRESHOLD = -1``, mallopt(3): a finite threshold is at most 2 GiB, the
largest ``int``, and a program with more temporaries than that, such as the SimCLR ResNet-1D
step at the PTB-XL shape, had them all trimmed and faulted in again on every call). It serves
every thread from the main arena (``M_ARENA_MAX = 1``: a thread's own arena is a 64 MiB heap
that glibc unmaps once it is empty, whatever the trim threshold), so freed blocks stay mapped
and a later call finds them there. The price: the process's resident memory stays
near its peak, the largest program's temporaries a few times over (fragmentation settles
after some calls), instead of shrinking between calls, as with PyTorch's and JAX's own
device allocators. Call it before the first JAX computation: a thread that allocated before
it keeps an arena of its own, which hands a block above 64 MiB back to the system when freed
(docs/benchmarks.md, "The SimCLR ResNet-1D: the filter gradient"). The
launchers and benchmarks call it first; call it yourself at the top of a notebook;
``JAXSAFE_RETAIN_HOST_MEMORY=0`` turns it off. Other C libraries (musl, macOS): nothing to do.
"""

import ctypes
import ctypes.util
import functools
import os

# glibc's <malloc.h>: mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
#: Set to 0 to leave glibc's defaults alone.
ENV = "JAXSAFE_RETAIN_HOST_MEMORY"
#: mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely" (glibc stores the
#: value as a size_t, so -1 is the largest threshold there is).
TRIM_THRESHOLD = -1


@functools.cache
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def retain() -> bool:
    """Makes glibc's malloc keep freed memory for reuse (see the module docstring); process
    wide, from now on. Returns True where it did; False without glibc or with
    $JAXSAFE_RETAIN_HOST_MEMORY=0."""
    libc = _glibc()
    if libc is None or os.environ.get(ENV, "1").strip() == "0":
        return False
    # mallopt returns 1 on success; every value is in range, so 0 means no such setting.
    return all(
        libc.mallopt(param, value) == 1
        for param, value in (
            (_M_ARENA_MAX, 1),
            (_M_MMAP_MAX, 0),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
    )
