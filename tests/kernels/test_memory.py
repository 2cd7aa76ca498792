"""memory.py: huge-page-advised buffers are ordinary tensors, and the advice reaches the kernel."""

import os
import sys

import pytest
import torch

from moebuild.kernels.memory import _MIN_BYTES, empty_huge, zeros_huge_like


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_buffers_have_the_asked_shape_dtype_and_values():
    like = torch.ones(3, dtype=torch.float64)
    big = empty_huge((_MIN_BYTES // 8 + 5,), like)
    assert big.shape == (_MIN_BYTES // 8 + 5,) and big.dtype == torch.float64
    assert torch.equal(zeros_huge_like(big), torch.zeros_like(big))
    assert empty_huge((2, 3), like).shape == (2, 3)  # small: no advice, still a tensor


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
    reason="transparent huge pages are a Linux feature",
)
def test_large_buffer_is_advised_to_huge_pages():
    big = empty_huge((4 * _MIN_BYTES // 4,), torch.empty(0))
    middle = big.data_ptr() + big.numel() * big.element_size() // 2
    assert "hg" in _vm_flags(middle)
