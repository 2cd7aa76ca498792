"""Expert dispatch backends by name; every backend is `fn(x_TD, weights_TK, ids_TK, pool) -> y_TD`.

"eager" is the per-expert reference loop, "torch" the sort-based pure-PyTorch custom op (the
fast CPU path), "triton" the Triton kernels (imported on first use only, so CPU installs never
import triton); "auto" picks the torch path everywhere for now: the Triton kernels are checked
only under TRITON_INTERPRET on CPU, and become the CUDA default once a GPU run has verified and
timed them natively (issue 7).
"""

from collections.abc import Callable

import torch
from torch import Tensor

from moebuild.kernels.reference import eager_dispatch
from moebuild.kernels.torch_sorted import sorted_dispatch

DispatchFn = Callable[[Tensor, Tensor, Tensor, "torch.nn.Module"], Tensor]


def triton_dispatch(x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, pool) -> Tensor:
    from moebuild.kernels.triton.dispatch import triton_dispatch as dispatch

    return dispatch(x_TD, weights_TK, ids_TK, pool)


BACKENDS: dict[str, DispatchFn] = {
    "eager": eager_dispatch,
    "torch": sorted_dispatch,
    "triton": triton_dispatch,
}


def auto_backend(device: torch.device) -> str:
    """The backend "auto" picks on a device: the torch path everywhere until the Triton kernels are
    verified natively on a GPU (then "triton" on CUDA)."""
    return "torch"


def check_backend(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown dispatch backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return name


def runs_on(name: str, device: torch.device) -> bool:
    """Whether a backend runs natively on the device (triton on CPU only under its slow interpreter)."""
    return name != "triton" or device.type == "cuda"


def get_dispatch(name: str, device: torch.device) -> DispatchFn:
    if name == "auto":
        name = auto_backend(device)
    return BACKENDS[check_backend(name)]
