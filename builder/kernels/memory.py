"""Large CPU buffers backed by transparent huge pages, for the dispatch's per-call tensors.

The CPU dispatch allocates a few buffers of A x D floats per call (the gathered input, the expert
outputs, their gradients) and returns the experts' weight gradients, which at config B are 384 MB
fresh every backward. glibc serves such sizes with a new `mmap`, so every 4 KiB page is faulted
in (and zeroed by the kernel) on first write and unmapped on free. Measured on the project's
2-core CPU (torch 2.13): writing a fresh 256 MB tensor 129 ms, an existing one 17 ms, a fresh one
advised to huge pages 30 ms. PyTorch does the same for all its CPU allocations only when the
process starts with THP_MEM_ALLOC_ENABLE=1, which a library cannot set after torch is imported;
`madvise(MADV_HUGEPAGE)` on one untouched buffer has the same effect for that buffer.

It is a hint: where the kernel has THP off, or on other systems, the buffer is plain memory.
"""

import ctypes
import mmap
import sys

from torch import Tensor

_MADV_HUGEPAGE = 14  # linux/mman.h
_PAGE = mmap.PAGESIZE
# glibc serves a request at or above its largest dynamic mmap threshold (32 MiB on 64-bit) with
# a fresh mapping of its own, so the advice never lands on heap memory that is later reused.
_MIN_BYTES = 32 << 20

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def empty_huge(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised tensor of `like`'s dtype and device; on Linux CPU, those of 32 MiB and more
    are advised to huge pages before any page of them is touched."""
    out = like.new_empty(shape)
    nbytes = out.numel() * out.element_size()
    if _libc is not None and out.device.type == "cpu" and nbytes >= _MIN_BYTES:
        start = -(-out.data_ptr() // _PAGE) * _PAGE
        end = (out.data_ptr() + nbytes) // _PAGE * _PAGE
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    return out


def empty_huge_like(t: Tensor) -> Tensor:
    return empty_huge(tuple(t.shape), t)


def zeros_huge_like(t: Tensor) -> Tensor:
    return empty_huge_like(t).zero_()

