"""Expert dispatch backends by name; every backend is `fn(x_TD, weights_TK, ids_TK, pool) -> y_TD`.

"eager" is the per-expert reference loop, "torch" the sort-based pure-PyTorch path; "auto" picks
the fastest backend available on the input's device (Triton on GPU once it exists).
"""

from collections.abc import Callable

import torch
from torch import Tensor

from moebuild.kernels.reference import eager_dispatch
from moebuild.kernels.torch_sorted import sorted_dispatch

DispatchFn = Callable[[Tensor, Tensor, Tensor, "torch.nn.Module"], Tensor]

BACKENDS: dict[str, DispatchFn] = {
    "eager": eager_dispatch,
    "torch": sorted_dispatch,
}

# device type -> backend used by "auto"; any device not listed uses AUTO_DEFAULT.
AUTO: dict[str, str] = {"cpu": "torch"}
AUTO_DEFAULT = "torch"


def check_backend(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown dispatch backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    return name


def get_dispatch(name: str, device: torch.device) -> DispatchFn:
    if name == "auto":
        name = AUTO.get(device.type, AUTO_DEFAULT)
    return BACKENDS[check_backend(name)]
