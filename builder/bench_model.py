"""`moebuild bench model SPEC --against hf`: a whole moebuild model beside transformers' own model of
the same architecture, on the same weights, in one process.

The spec must map onto a transformers MoE family (`moebuild.convert.hf`: Mixtral, Qwen2-MoE,
Qwen3-MoE, DeepSeek-V2, DeepSeek-V3; text only). transformers' model is built from the config
`hf.config_from_spec` writes, with its fastest experts implementation (`grouped_mm` where it runs),
and random weights (routers too, so routing is far from uniform); moebuild's model loads the same
tensors through `hf.to_moebuild`. Logits are compared first; then every workload is timed,
interleaved (one sample of each model in turn), and reported as medians with the spread and the
ratio moebuild / transformers.

Workloads: a training step (forward + backward with labels, no optimiser) on a batch x length
batch; prefill of one sequence of 128 and of 512 tokens; greedy generation of 32 tokens after a
128-token prompt; one decode step after a 128-token prompt (the cache filled untimed). A workload
that needs more positions than the model's `language.max_position_embeddings` is a skipped row.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from moebuild.accounting import check_context
from moebuild.spec.errors import did_you_mean

EXPERTS_IMPLEMENTATION = "grouped_mm"
MIN_SAMPLE_S = 0.2  # a sample repeats the workload until it lasts this long
LOGITS_CHECK_LENGTH = 64  # tokens per sequence of the logits comparison (fewer if the model has fewer positions)
POSITIONS_KEY = "language.max_position_embeddings"


@dataclass
class Row:
    workload: str
    moebuild_ms: float | None
    transformers_ms: float | None
    moebuild_spread_ms: tuple[float, float] | None
    transformers_spread_ms: tuple[float, float] | None
    skipped: str | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.skipped else self.moebuild_ms / self.transformers_ms


def build_pair(spec, seed: int = 0):
    """(moebuild model, transformers model) on the same random weights, both in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moebuild.convert import hf
    from moebuild.model.vlm import build

    config, _ = hf.from_moebuild(build(spec, device="meta").state_dict(), spec)
    hf_config = AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    theirs = AutoModelForCausalLM.from_config(hf_config, experts_implementation=EXPERTS_IMPLEMENTATION)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            is_norm = "norm" in name
            param.copy_(torch.randn_like(param) * (0.1 if is_norm else 0.02) + is_norm)
            if ".gate.weight" in name:
                param.mul_(50)  # routers far from uniform: the experts' loads are uneven, as in real models
    ours = build(spec)
    ours.load_state_dict(hf.to_moebuild(theirs.state_dict(), spec), strict=True)
    return ours.eval(), theirs.eval()


def check_logits(ours, theirs, vocab: int, tolerance: float = 1e-4, length: int = LOGITS_CHECK_LENGTH) -> float:
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    diff = ((a - b).abs().max() / b.abs().max()).item()
    if diff > tolerance:
        raise ValueError(f"moebuild's logits differ from transformers' by {diff:.2e} (relative), over {tolerance}")
    return diff


def workloads(vocab: int, batch: int, length: int) -> dict[str, tuple[int, Callable]]:
    """name -> (positions it needs, fn(model) -> a callable that runs the workload once, setup done
    outside the timing)."""
    g = torch.Generator().manual_seed(2)

    def ids(b, s):
        return torch.randint(3, vocab, (b, s), generator=g)

    def train_step(model):
        x = ids(batch, length)

        def run():
            model.train()
            model(input_ids=x, labels=x).loss.backward()
            model.zero_grad(set_to_none=True)
            model.eval()
        return run

    def prefill(n):
        def make(model):
            x = ids(1, n)

            def run():
                with torch.no_grad():
                    model(input_ids=x, use_cache=False)
            return run
        return make

    def generate(model):
        x = ids(1, 128)
        return lambda: model.generate(input_ids=x, max_new_tokens=32, min_new_tokens=32, do_sample=False)

    def decode_step(model):
        x = ids(1, 128)
        with torch.no_grad():
            out = model(input_ids=x, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        cache, length_ = out.past_key_values, x.shape[1]

        def run():
            with torch.no_grad():
                model(input_ids=nxt, past_key_values=cache, use_cache=True,
                      cache_position=torch.tensor([length_]))
                cache.crop(-1)  # the next sample decodes the same position again
        return run

    return {f"train step {batch} x {length}": (length, train_step), "prefill 1 x 128": (128, prefill(128)),
            "prefill 1 x 512": (512, prefill(512)), "generate 128 + 32 greedy": (128 + 32, generate),
            "prompt 128 + 1 token": (128 + 1, decode_step)}


def check_only(only: Iterable[str], names: Iterable[str]) -> None:
    """ValueError for a filter that is part of no workload name."""
    names = list(names)
    words = sorted({word for name in names for word in name.split() if word.isalpha()})
    for part in only:
        if not any(part in name for name in names):
            raise ValueError(f"{part!r} matches no workload; expected part of one of: {', '.join(names)}"
                             f"{did_you_mean(part, words + names)}")


def _sample_ms(run: Callable[[], None]) -> float:
    run()  # untimed: each sample starts after a call of its own (moebuild.bench.sample_ms)
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_SAMPLE_S:
            return elapsed * 1e3 / calls


def bench_model(spec, *, batch: int = 4, length: int = 512, repeats: int = 5,
                only: tuple[str, ...] = ()) -> tuple[float, list[Row]]:
    """(relative logits difference, one Row per workload); ValueError for a `length` or an `only`
    it cannot take (`accounting.check_context`, `check_only`)."""
    vocab, limit = spec.language.vocab_size, spec.language.max_position_embeddings
    planned = workloads(vocab, batch, length)
    check_context(spec, length)
    check_only(only, planned)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5.2x renames past_key_values
    ours, theirs = build_pair(spec)
    diff = check_logits(ours, theirs, vocab, length=min(LOGITS_CHECK_LENGTH, limit))
    rows = []
    for name, (positions, make) in planned.items():
        if only and not any(o in name for o in only):
            continue
        if positions > limit:
            rows.append(Row(name, None, None, None, None,
                            skipped=f"needs {positions} positions, the model has {limit} ({POSITIONS_KEY})"))
            continue
        runs = {"ours": make(ours), "theirs": make(theirs)}
        samples = {"ours": [], "theirs": []}
        for round_ in range(repeats):  # interleaved: both models see the same machine state
            for who in ("ours", "theirs") if round_ % 2 == 0 else ("theirs", "ours"):  # neither always first
                samples[who].append(_sample_ms(runs[who]))
        rows.append(Row(name, statistics.median(samples["ours"]), statistics.median(samples["theirs"]),
                        (min(samples["ours"]), max(samples["ours"])),
                        (min(samples["theirs"]), max(samples["theirs"]))))
    return diff, rows


def format_rows(spec, diff: float, rows: list[Row]) -> str:
    lines = [f"{spec.name}: moebuild vs transformers ({EXPERTS_IMPLEMENTATION}), {torch.get_num_threads()} threads, "
             f"logits agree to {diff:.1e}",
             f"{'workload':<26} {'moebuild ms':>12} {'(min-max)':>17} {'transformers ms':>16} {'(min-max)':>17} {'ratio':>6}"]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.workload:<26} skipped: {r.skipped}")
            continue
        lines.append(f"{r.workload:<26} {r.moebuild_ms:12.1f} {r.moebuild_spread_ms[0]:8.1f}-{r.moebuild_spread_ms[1]:<8.1f} "
                     f"{r.transformers_ms:16.1f} {r.transformers_spread_ms[0]:8.1f}-{r.transformers_spread_ms[1]:<8.1f} "
                     f"{r.ratio:6.2f}")
    return "\n".join(lines)


def to_json(spec, diff: float, rows: list[Row]) -> dict:
    import transformers

    return {"spec": spec.name, "experts_implementation": EXPERTS_IMPLEMENTATION, "logits_rel_diff": diff,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}
