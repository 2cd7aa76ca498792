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


def test_a_rank_needs_memory_for_its_share_of_the_experts():
    from moebuild.accounting import params_per_rank
    from moebuild.parallel.checkpoint import with_expert_parallel

    spec = moebuild.load_spec("micro-moe-llava")
    model = moebuild.build(spec, device="meta")
    experts = sum(p.numel() for name, p in model.named_parameters() if ".pools." in name)
    total = sum(p.numel() for p in model.parameters())
    assert params_per_rank(spec) == total
    for n in (2, 4):
        assert params_per_rank(with_expert_parallel(spec, n)) == total - experts + experts // n
    base = moebuild.load_spec("deepseek-vl2-base", overrides=["moe.parallel.replicate=[shared]"])
    per_rank = params_per_rank(with_expert_parallel(base, 8))
    assert 5.5e9 < per_rank < 6.5e9  # of 27.5B: the 72 routed experts over 8 ranks, all else whole
