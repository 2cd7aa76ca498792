"""`moebuild bench moe`: every dispatch backend beside transformers' experts implementations.

One process times, on the same weights and the same fixed routing:
- every moebuild dispatch backend that runs on the device (`moebuild.moe.dispatch.BACKENDS`);
- every transformers `experts_implementation` that runs there (eager, batched_mm, grouped_mm;
  transformers/integrations/moe.py) on `MixtralExperts`, whose stacked layout equals ours;
- a dense SwiGLU FFN (transformers' `Qwen2MoeMLP`) of the same activated FLOPs, K*I + S wide:
  the practical limit.
A shared SwiGLU of width S, when asked for, is added to every MoE variant: moebuild routes it
through its dispatch as a one-expert pool (as the layer's dense route does), transformers through
`Qwen2MoeMLP` (as Qwen2-MoE and DeepSeek-V2 do). The router is left out: it is the same for all
and costs under 1% (cpu-dispatch-notes.md finding 6). Outputs are checked against moebuild's
eager reference before anything is timed.

Legend: T tokens, D hidden, K top-k, E experts, I expert intermediate, S shared intermediate.
"""

import copy
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP

from moebuild.moe.dispatch import BACKENDS, runs_on
from moebuild.moe.experts import ExpertPool
from moebuild.spec.errors import did_you_mean

TRANSFORMERS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
# Every row's name; those that do not run on a device (triton on CPU) are left out there.
IMPLEMENTATIONS = (*(f"moebuild {name}" for name in BACKENDS),
                   *(f"transformers {impl}" for impl in TRANSFORMERS_IMPLEMENTATIONS), "dense")
# torch._grouped_mm (aten's check_valid_strides_and_return_transposed, on CPU and CUDA alike) wants
# each operand's non-contiguous stride a multiple of 16 bytes: transformers' operands are x [S, D],
# gate_up_proj^T [E, D, 2I], the gated product [S, I] and down_proj^T [E, I, D], so D and I.
GROUPED_MM_STRIDE_BYTES = 16
# batched_mm copies each slot's expert weights ([T*K, 2I, D] and [T*K, D, I]); skip it past this.
BATCHED_MM_MAX_BYTES = 4 << 30
MIN_SAMPLE_S = 0.05  # a timing sample repeats the call until it lasts this long (decode sizes)

Layer = Callable[[Tensor, Tensor, Tensor], Tensor]
Params = list[torch.nn.Parameter]


@dataclass(frozen=True)
class MoEConfig:
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    shared: int = 0  # width of the shared SwiGLU; 0 = none

    @property
    def dense_width(self) -> int:
        return self.top_k * self.intermediate + self.shared


@dataclass
class Result:
    impl: str
    tokens: int
    forward_ms: float | None
    forward_backward_ms: float | None
    forward_tokens_per_s: float | None
    forward_backward_tokens_per_s: float | None
    forward_vs_dense: float | None
    forward_backward_vs_dense: float | None
    max_abs_diff: float | None  # vs moebuild eager, relative to the reference's largest magnitude
    skipped: str | None = None


def build_layers(cfg: MoEConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, tuple[Layer, Params]]:
    """name -> (fn(x_TD, weights_TK, ids_TK) -> y_TD, its parameters), all on the same weights."""
    torch.manual_seed(seed)
    D, E, I, S = cfg.hidden, cfg.experts, cfg.intermediate, cfg.shared
    factory = {"device": device, "dtype": dtype}
    pool = ExpertPool(E, D, I, init_std=D**-0.5, **factory)
    shared = ExpertPool(1, D, S, init_std=D**-0.5, **factory) if S else None
    hf_config = MixtralConfig(hidden_size=D, intermediate_size=I, num_local_experts=E, num_experts_per_tok=cfg.top_k)
    hf_shared = _hf_mlp(hf_config, shared) if shared is not None else None
    ours = [*pool.parameters(), *(shared.parameters() if shared is not None else [])]
    theirs = [*pool.parameters(), *(hf_shared.parameters() if hf_shared is not None else [])]
    layers = {}
    for name, dispatch in BACKENDS.items():
        if runs_on(name, device):
            layers[f"moebuild {name}"] = (_moebuild_layer(dispatch, pool, shared), ours)
    for impl in TRANSFORMERS_IMPLEMENTATIONS:
        # transformers reads the implementation from the config at every forward, so each layer
        # needs its own config; with one shared config every row timed the last one set.
        experts = MixtralExperts(copy.deepcopy(hf_config)).to(**factory)
        experts.gate_up_proj, experts.down_proj = pool.gate_up_proj, pool.down_proj  # shared, not copied
        experts.config._experts_implementation = impl
        layers[f"transformers {impl}"] = (_transformers_layer(experts, hf_shared), theirs)
    dense = _hf_mlp(hf_config, ExpertPool(1, D, cfg.dense_width, init_std=D**-0.5, **factory))
    layers["dense"] = (lambda x_TD, weights_TK, ids_TK: dense(x_TD), list(dense.parameters()))
    return layers


def _hf_mlp(hf_config, pool: ExpertPool) -> Qwen2MoeMLP:
    """transformers' SwiGLU MLP holding the weights of a one-expert pool."""
    width = pool.intermediate_size
    mlp = Qwen2MoeMLP(hf_config, intermediate_size=width).to(pool.down_proj.device, pool.down_proj.dtype)
    gate, up = pool.gate_up_proj[0].detach().split(width)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(gate)
        mlp.up_proj.weight.copy_(up)
        mlp.down_proj.weight.copy_(pool.down_proj[0])
    return mlp


def _moebuild_layer(dispatch, pool: ExpertPool, shared: ExpertPool | None) -> Layer:
    def layer(x_TD, weights_TK, ids_TK):
        y_TD = dispatch(x_TD, weights_TK, ids_TK, pool)
        if shared is not None:
            ones_T1 = x_TD.new_ones(x_TD.shape[0], 1, dtype=weights_TK.dtype)
            y_TD = y_TD + dispatch(x_TD, ones_T1, torch.zeros_like(ids_TK[:, :1]), shared)
        return y_TD

    return layer


def _transformers_layer(experts: MixtralExperts, shared: Qwen2MoeMLP | None) -> Layer:
    def layer(x_TD, weights_TK, ids_TK):
        y_TD = experts(x_TD, ids_TK, weights_TK.to(x_TD.dtype))
        return y_TD + shared(x_TD) if shared is not None else y_TD

    return layer


def fixed_routing(tokens: int, cfg: MoEConfig, device: torch.device, seed: int = 1) -> tuple[Tensor, Tensor]:
    """A top-k softmax routing of random logits: distinct experts per token, weights in fp32."""
    g = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(tokens, cfg.experts, generator=g)
    weights_TK, ids_TK = logits_TE.softmax(dim=-1).topk(cfg.top_k, dim=-1)
    return weights_TK.to(device), ids_TK.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_ms(step: Callable[[], None], device: torch.device) -> float:
    """The time of one call in ms, averaged over as many calls as fill MIN_SAMPLE_S, after one
    untimed call.

    With the untimed call, each implementation is timed right after a call of its own, as a
    microbenchmark of one layer usually is. Without it, a sample at training sizes is the first
    call after another implementation, and pays for the memory that one freed: on the project's
    VM (Firecracker, free page reporting) the guest kernel hands freed blocks back to the host,
    and whatever touches that memory next takes host faults. Config A, 2048 tokens, fwd+bwd,
    medians of 5: moebuild torch 1661 ms (0.30 s in the kernel) timed straight after
    transformers grouped_mm, 1502 ms (0.14 s) after a call of its own; the dense layer 1528 and
    1471 ms. In a model, other layers run between two calls of a layer, so the effect there lies
    in between.
    """
    step()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        step()
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_SAMPLE_S:
            return elapsed / calls * 1e3


def steps(layer: Layer, params: Params, x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor):
    """(forward, forward+backward) callables; gradients are dropped between calls, not accumulated."""

    def forward():
        with torch.no_grad():
            layer(x_TD, weights_TK, ids_TK)

    grad_TD = torch.randn_like(x_TD)
    x_grad, w_grad = x_TD.detach().requires_grad_(), weights_TK.detach().requires_grad_()

    def forward_backward():
        for t in (x_grad, w_grad, *params):
            t.grad = None
        layer(x_grad, w_grad, ids_TK).backward(grad_TD)

    return forward, forward_backward


def time_layers(layers: dict[str, tuple[Layer, Params]], x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor,
                backward: bool, repeats: int) -> dict[str, tuple[float, float | None]]:
    """name -> (median forward ms, median forward+backward ms or None).

    Round-robin: each round times every layer once, so a change in the machine's load (other
    processes share the cores) falls on all of them alike rather than on whichever ran then; odd
    rounds go in reverse, so no layer always runs right after the same other one. Each sample
    starts with an untimed call (`sample_ms`), which also warms up.
    """
    modes = 2 if backward else 1
    calls = {name: steps(*lp, x_TD, weights_TK, ids_TK)[:modes] for name, lp in layers.items()}
    samples = {name: [[] for _ in range(modes)] for name in calls}
    for round_ in range(repeats):
        order = list(calls) if round_ % 2 == 0 else list(reversed(calls))
        for mode in range(modes):
            for name in order:
                samples[name][mode].append(sample_ms(calls[name][mode], x_TD.device))
    return {name: (statistics.median(s[0]), statistics.median(s[1]) if backward else None)
            for name, s in samples.items()}


def check_outputs(reference: Layer, layers: dict[str, tuple[Layer, Params]], x_TD: Tensor, weights_TK: Tensor,
                  ids_TK: Tensor) -> dict[str, float]:
    """Max |y - y_ref| / max |y_ref| of every MoE layer (dense computes something else)."""
    with torch.no_grad():
        want = reference(x_TD, weights_TK, ids_TK).float()
        scale = want.abs().max().clamp_min(1e-30)
        return {
            name: float((layer(x_TD, weights_TK, ids_TK).float() - want).abs().max() / scale)
            for name, (layer, _) in layers.items()
            if name != "dense"
        }


def timing_device(device: str) -> torch.device:
    """The torch device `device` names, if layers can be timed there; else ValueError saying why."""
    expected = "expected cpu, cuda or cuda:N"
    try:
        dev = torch.device(device)
    except RuntimeError:
        hint = "; did you mean 'cuda'?" if device.lower().startswith("gpu") else did_you_mean(device.lower(), ("cpu", "cuda"))
        raise ValueError(f"{device!r} is not a torch device; {expected}{hint}") from None
    if dev.type == "meta":
        raise ValueError(f"'meta' tensors hold no data, so nothing runs there to time; {expected}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{device!r}: only cpu and cuda can be timed here (cuda is the one device synchronised); {expected}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{device!r}: torch {torch.__version__} sees no CUDA device on this machine; expected cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return dev


def check_skip(skip: Iterable[str]) -> None:
    """ValueError for a name that is no implementation, and for dense (every ratio is against it)."""
    for name in skip:
        if name == "dense":
            raise ValueError("'dense' cannot be skipped: every 'x dense' ratio is against it")
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"{name!r} is no implementation; expected one of: {', '.join(IMPLEMENTATIONS[:-1])}"
                             f"{_suggest(name)}")


def _suggest(name: str) -> str:
    """A did-you-mean that also catches a short name ("eager" -> both eager rows)."""
    tails = [full for full in IMPLEMENTATIONS[:-1] if full.split()[-1] == name.lower()]
    if tails:
        return "; did you mean " + " or ".join(repr(full) for full in tails) + "?"
    return did_you_mean(name, IMPLEMENTATIONS[:-1])


def bench_moe(cfg: MoEConfig, tokens: list[int], *, backward: bool = False, repeats: int = 5,
              device: str = "cpu", dtype: torch.dtype = torch.float32, tolerance: float = 1e-4,
              skip: tuple[str, ...] = ()) -> list[Result]:
    """Time every layer at every token count; raises ValueError if an output disagrees, and for a
    device or a skipped name it cannot take (`timing_device`, `check_skip`)."""
    dev = timing_device(device)
    check_skip(skip)
    built = build_layers(cfg, dev, dtype)
    reference = built["moebuild eager"][0]
    layers = {n: lp for n, lp in built.items() if n not in skip}
    results = []
    for T in tokens:
        weights_TK, ids_TK = fixed_routing(T, cfg, dev)
        x_TD = torch.randn(T, cfg.hidden, device=dev, dtype=dtype)
        runnable = {n: lp for n, lp in layers.items() if _skip_reason(n, T, cfg, dtype) is None}
        diffs = check_outputs(reference, runnable, x_TD, weights_TK, ids_TK)
        bad = {n: d for n, d in diffs.items() if not d <= tolerance}
        if bad:
            raise ValueError(f"outputs disagree with moebuild eager at {T} tokens: {bad}")
        timed = time_layers(runnable, x_TD, weights_TK, ids_TK, backward, repeats)
        dense_f, dense_fb = timed["dense"]
        for name in layers:
            if name not in timed:
                results.append(Result(name, T, *[None] * 7, skipped=_skip_reason(name, T, cfg, dtype)))
                continue
            f, fb = timed[name]
            results.append(Result(
                name, T, f, fb, T / f * 1e3, T / fb * 1e3 if fb else None,
                f / dense_f, fb / dense_fb if fb else None, diffs.get(name),
            ))
    return results


def _skip_reason(name: str, T: int, cfg: MoEConfig, dtype: torch.dtype) -> str | None:
    if name == "transformers batched_mm":
        per_slot = 3 * cfg.intermediate * cfg.hidden * dtype.itemsize
        if T * cfg.top_k * per_slot > BATCHED_MM_MAX_BYTES:
            return f"would copy {T * cfg.top_k * per_slot / 2**30:.0f} GiB of per-slot weights"
    if name == "transformers grouped_mm":
        multiple = GROUPED_MM_STRIDE_BYTES // dtype.itemsize
        if cfg.hidden % multiple or cfg.intermediate % multiple:
            return (f"torch._grouped_mm needs 16-byte strides: hidden and intermediate multiples of {multiple} in "
                    f"{str(dtype).removeprefix('torch.')}, not {cfg.hidden} and {cfg.intermediate}")
    return None


def format_table(cfg: MoEConfig, results: list[Result]) -> str:
    shared = f" + shared SwiGLU {cfg.shared}" if cfg.shared else ""
    lines = [
        f"hidden {cfg.hidden}, {cfg.experts} experts top-{cfg.top_k}, SwiGLU {cfg.intermediate}{shared}; "
        f"dense equivalent SwiGLU {cfg.dense_width}; {torch.get_num_threads()} threads",
        f"{'tokens':>6}  {'impl':24} {'fwd ms':>9} {'tok/s':>9} {'x dense':>7} {'f+b ms':>9} {'tok/s':>9} {'x dense':>7}",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"{r.tokens:>6}  {r.impl:24} skipped: {r.skipped}")
            continue
        fb = (f"{r.forward_backward_ms:9.1f} {r.forward_backward_tokens_per_s:9.0f} {r.forward_backward_vs_dense:7.2f}"
              if r.forward_backward_ms is not None else "")
        lines.append(f"{r.tokens:>6}  {r.impl:24} {r.forward_ms:9.1f} {r.forward_tokens_per_s:9.0f} "
                     f"{r.forward_vs_dense:7.2f} {fb}".rstrip())
    return "\n".join(lines)


def to_json(cfg: MoEConfig, results: list[Result], device: str, dtype: torch.dtype) -> dict:
    import transformers

    return {
        "config": asdict(cfg) | {"dense_width": cfg.dense_width},
        "device": device, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "results": [asdict(r) for r in results],
    }
