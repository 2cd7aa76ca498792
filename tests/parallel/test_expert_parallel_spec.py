"""Expert parallelism in one process: the spec key, the build argument and their errors."""

import pytest

import moebuild
from moebuild.spec.errors import BuildError


def test_the_spec_refuses_experts_that_do_not_split_over_the_ranks():
    with pytest.raises(moebuild.SpecError, match=r"num_experts=4 is not divisible by expert_parallel=3"):
        moebuild.load_spec("micro-moe-llava", overrides=["moe.parallel.expert_parallel=3"])
    assert moebuild.load_spec("micro-moe-llava").moe.parallel.expert_parallel == 1


def test_the_build_argument_says_what_is_missing():
    with pytest.raises(BuildError, match=r"num_experts=4 is not divisible by expert_parallel=3"):
        moebuild.build("micro-moe-llava", expert_parallel=3, device="meta")
    with pytest.raises(BuildError, match=r"expert_parallel=2 needs torch.distributed initialised .*torchrun --nproc-per-node 2"):
        moebuild.build("micro-moe-llava", expert_parallel=2, device="meta")


def test_one_rank_is_the_single_process_model():
    model = moebuild.build("micro-moe-llava", expert_parallel=1, device="meta")
    pool = model.language.layers[0].mlp.pools["experts"]
    assert pool.parallel is None and pool.num_local_experts == pool.num_experts == 4
    assert model.language.layers[0].mlp.parallel is None
