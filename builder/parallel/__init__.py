"""Expert parallelism on torch.distributed (expert.py: groups, all-to-all dispatch, reductions;
checkpoint.py: loading a rank's expert slices, gathering a sharded model for saving; fsdp.py:
FSDP2 over the replicated weights). checkpoint and fsdp are imported on use (they import the pools)."""

from moebuild.parallel.expert import (
    AllReduce,
    AllToAll,
    ExpertParallel,
    average_expert_grads,
    average_gradients,
    expert_parallel_dispatch,
    local_sum,
)

__all__ = [
    "AllReduce",
    "AllToAll",
    "ExpertParallel",
    "average_expert_grads",
    "average_gradients",
    "expert_parallel_dispatch",
    "local_sum",
]
