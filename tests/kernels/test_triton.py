"""The Triton backend against the eager reference: natively on CUDA, else under TRITON_INTERPRET=1.

TRITON_INTERPRET must be set before triton is first imported, not only before the kernels are
decorated: triton.language's own helpers (`tl.sigmoid`, reductions) are `@triton.jit` functions
decorated at that import, and transformers imports triton already. So on CPU the comparisons run
in a subprocess started with the variable set (this file, run as a script), which reports the
differences as JSON. The interpreter is ~3000x slower than torch: tiny shapes only.

Legend: T tokens, D hidden, K slots per token, E experts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # the interpreter: ~6 s even at these shapes; .ci/run runs it

FP32_CASES = ["basic", "empty_experts", "all_on_one_expert", "e1", "one_token", "no_tokens",
              "dropped_slots", "all_dropped", "gated_bias", "fc_gelu_bias", "fc_relu"]
HALF_CASES = ["bfloat16", "float16"]


def compare(case: str, dtype: str, device: str) -> dict[str, tuple[float, float]]:
    """name -> (max |triton - eager|, max |eager|) for the output and every gradient.

    In half precision both run on the same rounded inputs; the reference runs in fp32.
    """
    from test_dispatch import make_case, output_and_grads

    from moebuild.moe.dispatch import BACKENDS

    pool, x_TD, weights_TK, ids_TK = make_case(case)
    weights_TK, ids_TK = weights_TK.to(device), ids_TK.to(device)
    half = getattr(torch, dtype)
    pool, x_TD = pool.to(device, half), x_TD.to(device, half)
    got, got_grads = output_and_grads(BACKENDS["triton"], pool, x_TD, weights_TK, ids_TK)
    want, want_grads = output_and_grads(BACKENDS["eager"], pool.float(), x_TD.float(), weights_TK, ids_TK)
    assert got.dtype == half
    pairs = {"output": (got, want)} | {name: (got_grads[name], want_grads[name]) for name in want_grads}
    return {name: (_max(g.float() - w), _max(w)) for name, (g, w) in pairs.items()}


def _max(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def all_comparisons(device: str) -> dict[str, dict]:
    halves = HALF_CASES if device == "cuda" else ["float16"]  # see the bf16 skip below
    runs = [(case, "float32") for case in FP32_CASES] + [("dropped_slots", dtype) for dtype in halves]
    return {f"{case}/{dtype}": compare(case, dtype, device) for case, dtype in runs}


@pytest.fixture(scope="module")
def comparisons() -> dict[str, dict]:
    if torch.cuda.is_available():
        sys.path.insert(0, str(Path(__file__).parent))
        return all_comparisons("cuda") | {"triton modules imported by import moebuild": []}
    env = os.environ | {"TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", FP32_CASES)
def test_triton_matches_eager_fp32(comparisons, case):
    for name, (diff, scale) in comparisons[f"{case}/float32"].items():
        assert diff <= 1e-5 * max(scale, 1.0), (name, diff, scale)


@pytest.mark.parametrize("dtype", HALF_CASES)
def test_triton_half_precision_close_to_fp32_eager(comparisons, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_available():
        pytest.skip("triton 3.9's interpreter gets bf16 tl.dot wrong (a 16x16 bf16 dot returns values ~1e10)")
    for name, (diff, scale) in comparisons[f"dropped_slots/{dtype}"].items():
        assert diff <= 3e-2 * max(scale, 1e-3), (name, diff, scale)


def test_import_moebuild_does_not_import_the_triton_modules(comparisons):
    assert comparisons["triton modules imported by import moebuild"] == []


if __name__ == "__main__":
    import moebuild.moe  # noqa: F401  (the whole runtime, as a user imports it)

    eager = [name for name in sys.modules if name.startswith("moebuild.kernels.triton")]
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(all_comparisons("cpu") | {"triton modules imported by import moebuild": eager}))
