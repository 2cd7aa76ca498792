"""Expert parallelism against the single process, in 2 and 4 gloo processes launched from here.

Each launch starts N interpreters once (`ep_checks.py`) and runs every check in that one process
group: starting them costs more than the checks.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("ep_checks.py")
LAYER_CHECKS = ["topk", "shared_expert", "ltdr", "empty", "deepspeed_capacity", "bias_steps", "every_router", "errors"]


def launch(world: int, checks: list[str], tmp_path: Path, timeout: float = 150.0, ep: int | None = None) -> list[str]:
    """Run the checks on `world` ranks (expert-parallel groups of `ep`, default the world); every
    rank must pass each; returns rank 0's report lines."""
    init = tmp_path / f"init{ep}"
    prefix = [] if ep is None else ["--ep", str(ep)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, str(CHECKS), *prefix, str(rank), str(world), str(init), str(tmp_path), *checks],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(world)]
    results = []
    try:
        for proc in procs:
            results.append(proc.communicate(timeout=timeout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    failed = {rank: err for rank, (proc, (_, err)) in enumerate(zip(procs, results)) if proc.returncode}
    # the rank that failed first, not those whose peer closed the connection on them
    first = [rank for rank, err in failed.items() if "Connection closed by peer" not in err] or list(failed)
    assert not failed, f"ranks {sorted(failed)} of {world} failed; rank {first[0]}:\n{failed[first[0]][-4000:]}"
    lines = results[0][0].split()
    assert lines.count("ok") == len(checks), results[0][0]
    return results[0][0].splitlines()


@pytest.mark.slow
def test_two_ranks_match_the_single_process(tmp_path):
    launch(2, [*LAYER_CHECKS, "checkpoint", "checkpoint_errors", "fsdp"], tmp_path)


@pytest.mark.slow
def test_four_ranks_match_the_single_process(tmp_path):
    launch(4, [*LAYER_CHECKS, "checkpoint", "checkpoint_errors", "fsdp"], tmp_path)


@pytest.mark.slow
def test_two_expert_parallel_groups_of_two_match_the_single_process(tmp_path):
    """EP x DP: 4 ranks as 2 groups of 2; statistics over all 4, tokens inside each group."""
    launch(4, ["topk", "shared_expert", "ltdr", "empty", "bias_steps", "checkpoint", "fsdp"], tmp_path, ep=2)
