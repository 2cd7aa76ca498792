"""The ``moebuild`` command line (click).

A verb is one function under ``@main.command()``. Verbs that need torch (compile, summary's
allocation checks, graph, bench) import it inside the function: ``--help``, ``ls``, ``show``,
``validate`` and ``schema`` must answer without loading torch or transformers.
A SpecError raised by any verb prints its located lines on stderr and exits 1.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import sys
from pathlib import Path

import click

from moebuild.spec.errors import SpecError

_SET_HELP = ("Override a key, Hydra style; repeatable: a.b=1 (change), +a.b=1 (add), "
             "++a.b=1 (set either way), ~a.b (delete). Values are YAML: moe.layers=[0,2].")
SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"


class _Finite(click.FloatRange):
    """A FloatRange that also refuses nan (every comparison with nan is false, so the range lets it through)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


class _Output(click.Path):
    """A click.Path that refuses '': pathlib reads it as '.', so `-o ''` would name the current directory."""

    def convert(self, value, param, ctx):
        if value == "":
            self.fail("the output path is empty; give a file or directory name", param, ctx)
        return super().convert(value, param, ctx)


SEED = click.IntRange(0, 2**32 - 1)  # what every RNG here takes (the data order derives per-epoch seeds from it)


class _Group(click.Group):
    """Every error ends as its message and exit 1: a SpecError's located lines, anything else one
    line naming its type (MOEBUILD_TRACEBACK=1 shows the traceback instead, for bug reports)."""

    def invoke(self, ctx: click.Context):
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return super().invoke(ctx)
        except SpecError as exc:
            click.echo(str(exc), err=True)
            ctx.exit(1)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if os.environ.get("MOEBUILD_TRACEBACK"):
                raise
            click.echo(f"Error: {type(exc).__name__}: {_first_line(exc)}", err=True)
            ctx.exit(1)
        finally:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    """SIGTERM (kill, timeout, a job scheduler) unwinds like Ctrl-C, so staging directories are
    removed and a run that made no checkpoint leaves nothing; the default handler ends the process
    on the spot."""
    raise SystemExit(128 + signum)


def _given(option: str) -> bool:
    """Whether the user set the current command's `option` (not left at its default)."""
    source = click.get_current_context().get_parameter_source(option)
    return source not in (None, click.core.ParameterSource.DEFAULT)


def _write_file(output: Path, write, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """moebuild.output.write_file, its refusals as one-line CLI errors."""
    from moebuild.output import OutputError, write_file

    try:
        write_file(output, write, force, inputs)
    except OutputError as exc:
        raise click.ClickException(str(exc)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moebuild")
def main():
    """Build Mixture-of-Experts vision-language models from YAML specs.

    A SPEC is a zoo preset name (see `moebuild ls`) or a path to a YAML file.

    \b
    Examples:
      moebuild ls
      moebuild show micro-moe-llava --set moe.pools.experts.num_experts=8
      moebuild validate my_model.yaml
      moebuild schema -o moebuild.schema.json
    """


@main.command("ls")
def ls_cmd():
    """List the zoo presets, one per line: name, family, parameters (total / active).

    \b
    Example:
      moebuild ls
    """
    from moebuild.spec.presets import list_presets, preset_family

    names = list_presets()
    width = max((len(n) for n in names), default=0)
    for name in names:
        columns = [name.ljust(width), preset_family(name).ljust(12), *_param_columns(name)]
        click.echo("  ".join(columns).rstrip())


def _param_columns(name: str) -> list[str]:
    """Total and active parameter counts from moebuild.accounting, when that module is present."""
    if importlib.util.find_spec("moebuild.accounting") is None:
        return []
    from moebuild.accounting import summarize
    from moebuild.spec.loading import load_spec

    report = summarize(load_spec(name))
    return [f"{_human(report.total_params):>7} total", f"{_human(report.active_params):>7} active"]


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


@main.command()
@click.argument("spec")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--raw", is_flag=True,
              help="Print the merged data before validation (no defaults filled in); works on invalid specs.")
def show(spec: str, overrides: tuple[str, ...], raw: bool):
    """Print SPEC fully resolved as YAML: base: chain merged, overrides and ${...} applied, defaults filled.

    The output is itself a valid spec that loads to the same model.

    \b
    Examples:
      moebuild show micro-moe-llava
      moebuild show my_model.yaml --set moe.routes.0.router.top_k=1 > resolved.yaml
      moebuild show broken.yaml --raw
    """
    from moebuild.spec.loading import dump_yaml, load_spec, resolve_spec

    data = resolve_spec(spec, overrides) if raw else load_spec(spec, overrides).model_dump(mode="json")
    click.echo(dump_yaml(data), nl=False)


@main.command()
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
def validate(specs: tuple[str, ...], overrides: tuple[str, ...]):
    """Check each SPEC; print `ok: SPEC`, or every problem as `file:line:col: error: key.path: message`.

    Problems go to stderr, one line each; the exit status is 1 if any SPEC has one.
    Nothing is built and torch is not imported.

    \b
    Examples:
      moebuild validate my_model.yaml
      moebuild validate zoo/*/*.yaml
      moebuild validate micro-ltdr --set moe.routes.1.router.top_k=4
    """
    from moebuild.spec.loading import load_spec

    failed = False
    for spec in specs:
        try:
            load_spec(spec, overrides)
        except SpecError as exc:
            click.echo(str(exc), err=True)
            failed = True
        else:
            click.echo(f"ok: {spec}")
    if failed:
        raise SystemExit(1)


@main.command()
@click.option("-o", "--output", type=_Output(dir_okay=False, path_type=Path),
              help="Write to this file instead of stdout.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def schema(output: Path | None, force: bool):
    """Print the JSON Schema of a spec (every key, its type and description), for editors.

    With the YAML language server (VS Code's YAML extension, Neovim, Helix...), put this
    modeline on the first line of a spec to get completion, hover docs and checking:

    \b
      # yaml-language-server: $schema=moebuild.schema.json

    The schema describes a resolved spec, so a file that inherits with `base:` may be
    flagged for keys its base provides; `moebuild validate` is the authority.

    \b
    Examples:
      moebuild schema -o moebuild.schema.json
      moebuild schema | jq '.properties | keys'
    """
    text = json.dumps(spec_json_schema(), indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        _write_file(output, lambda path: path.write_text(text), force)
        click.echo(f"wrote {output}", err=True)


@main.command()
@click.argument("spec")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--context", type=click.IntRange(min=1),
              help="Context length the attention FLOPs per token are counted at, at most the model's "
                   "language.max_position_embeddings.  [default: 2048, or that maximum if smaller]")
def summary(spec: str, overrides: tuple[str, ...], as_json: bool, context: int | None):
    """Parameters (total and active per token, per component), FLOPs per token, weight memory per
    dtype and KV-cache bytes per token, computed from SPEC alone: nothing is allocated, so the
    largest presets answer at once.

    \b
    Examples:
      moebuild summary micro-deepseek-vl2
      moebuild summary my_model.yaml --json | jq .active_params
    """
    from moebuild.accounting import DEFAULT_CONTEXT, check_context, summarize
    from moebuild.spec.loading import load_spec

    parsed = load_spec(spec, overrides)
    if context is None:
        context = min(DEFAULT_CONTEXT, parsed.language.max_position_embeddings)
    try:
        check_context(parsed, context)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--context") from None
    report = summarize(parsed, context=context)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else summary_table(report))


@main.command("compile")
@click.argument("spec")
@click.option("-o", "--output", required=True, type=_Output(file_okay=False, path_type=Path),
              help="Directory to write the model to (config.json, model.safetensors, spec.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--device", type=click.Choice(["cpu", "meta"]), default="cpu", show_default=True,
              help="meta: build without allocating, write config.json and spec.yaml only.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--force", is_flag=True,
              help="Replace OUTPUT if it holds a model moebuild wrote (and nothing else).")
def compile_cmd(spec: str, output: Path, overrides: tuple[str, ...], device: str, dtype: str, seed: int, force: bool):
    """Build SPEC into a model and save it to OUTPUT, then print its summary.

    The model is written to a hidden staging directory beside OUTPUT and renamed at the end, so
    OUTPUT never holds a half-written model; a marker file (.moebuild.json) lists what moebuild
    wrote, and --force replaces nothing else. The directory loads back with
    `moebuild.MoEVLMForConditionalGeneration.from_pretrained(OUTPUT)`.

    \b
    Examples:
      moebuild compile micro-moe-llava -o out/micro-moe-llava
      moebuild compile my_model.yaml -o out/m --set moe.pools.experts.num_experts=8 --dtype bfloat16
      moebuild compile deepseek-vl2-tiny -o out/tiny --device meta
    """
    from moebuild.accounting import summarize
    from moebuild.output import OutputError, check_output
    from moebuild.spec.errors import BuildError
    from moebuild.spec.loading import load_spec

    ignored = [f"--{name}" for name in ("dtype", "seed") if _given(name)]
    if device == "meta" and ignored:
        raise click.UsageError(f"--device meta writes the config and spec only, no weights: {' and '.join(ignored)} "
                               "would change nothing")
    parsed = load_spec(spec, overrides)
    try:
        check_output(output, force)  # also checked by build_and_save; here it fails before torch is imported
    except OutputError as exc:
        raise click.ClickException(str(exc)) from None
    from transformers.utils import logging as hf_logging

    from moebuild.model.vlm import build_and_save

    hf_logging.disable_progress_bar()  # the summary table is the output; no shard-writing bars
    try:
        build_and_save(parsed, output, device=device, dtype=dtype, seed=seed, force=force)
    except (OutputError, BuildError) as exc:
        raise click.ClickException(str(exc)) from None
    except (ValueError, OSError, MemoryError, RuntimeError) as exc:
        # allocation failures, safetensors header errors, transformers' config validators...
        raise click.ClickException(f"{spec}: {_first_line(exc)}") from None
    click.echo(summary_table(summarize(parsed)))
    click.echo(f"wrote {output}" + (" (config and spec only: built on meta)" if device == "meta" else ""))


_FORMATS = ["hf", "deepseek_vl2", "moe_llava", "ltdr"]  # moebuild.convert.checkpoints.FORMATS, without importing torch


@main.command("import")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(_FORMATS))
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=_Output(path_type=Path),
              help="Model directory to write (with --spec-only: the spec's YAML file).")
@click.option("--spec", "spec_name", metavar="SPEC",
              help="Load into this spec (a preset or a file) instead of the one the checkpoint's config.json implies.")
@click.option("--spec-only", is_flag=True, help="Write only the spec the checkpoint's config.json describes; no weights read.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it holds a model moebuild wrote (and nothing else).")
def import_cmd(fmt: str, checkpoint: Path, output: Path, spec_name: str | None, spec_only: bool, force: bool):
    """Convert a released CHECKPOINT directory (config.json + safetensors) into a moebuild model.

    FORMAT: hf (transformers' Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, DeepSeek-V3), deepseek_vl2,
    moe_llava, ltdr. Every tensor must find its place: one error names all that are missing, left
    over or mis-shaped. Pickle checkpoints (.bin) are never loaded.

    \b
    Examples:
      moebuild import hf ./Qwen1.5-MoE-A2.7B -o out/qwen-moe
      moebuild import hf ./Mixtral-8x7B --spec-only -o mixtral.yaml
      moebuild import deepseek_vl2 ./deepseek-vl2-tiny --spec deepseek-vl2-tiny -o out/tiny
    """
    from moebuild.spec.loading import dump_yaml, load_spec

    if spec_only:
        if spec_name:
            raise click.UsageError("--spec-only writes the spec the checkpoint's config.json describes; "
                                   "it takes no --spec")
        from moebuild.convert.checkpoints import spec_of
        from moebuild.model.pretrained import CheckpointError

        try:
            spec = spec_of(fmt, checkpoint, name=output.stem)
        except CheckpointError as exc:
            raise click.ClickException(str(exc)) from None
        text = dump_yaml(spec.model_dump(mode="json", exclude_defaults=True))
        _write_file(output, lambda path: path.write_text(text), force, inputs=(checkpoint,))
        click.echo(f"wrote {output}")
        return
    spec = load_spec(spec_name) if spec_name else None
    from transformers.utils import logging as hf_logging

    from moebuild.convert.checkpoints import import_checkpoint
    from moebuild.model.pretrained import CheckpointError
    from moebuild.output import OutputError

    hf_logging.disable_progress_bar()  # the summary table is the output, as in compile
    try:
        spec = import_checkpoint(fmt, checkpoint, output, spec=spec, force=force)
    except (CheckpointError, OutputError) as exc:
        raise click.ClickException(str(exc)) from None
    from moebuild.accounting import summarize

    click.echo(summary_table(summarize(spec)))
    click.echo(f"wrote {output}")


@main.command("export")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(_FORMATS))
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=_Output(file_okay=False, path_type=Path),
              help="Directory to write the checkpoint to (config.json, model.safetensors).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if moebuild wrote everything in it.")
def export_cmd(fmt: str, model_dir: Path, output: Path, force: bool):
    """Write the moebuild model in MODEL_DIR as a checkpoint of FORMAT, loadable by that system's own
    code (hf: `transformers.AutoModelForCausalLM.from_pretrained(OUTPUT)`).

    \b
    Example:
      moebuild export hf out/qwen-moe -o out/qwen-moe-hf
    """
    from moebuild.convert.checkpoints import export_checkpoint
    from moebuild.model.pretrained import CheckpointError
    from moebuild.output import OutputError

    try:
        untranslated = export_checkpoint(fmt, model_dir, output, force=force)
    except (CheckpointError, OutputError) as exc:
        raise click.ClickException(str(exc)) from None
    for part in untranslated:
        click.echo(f"note: the {fmt} config has no field for the spec's {part} (training only); it is not exported")
    click.echo(f"wrote {output}")


@main.command()
@click.argument("spec")
@click.option("-o", "--output", required=True, type=_Output(dir_okay=False, path_type=Path),
              help="File to draw to; its extension picks the format: .svg, .png, .dot (or .gv).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def graph(spec: str, output: Path, overrides: tuple[str, ...], force: bool):
    """Draw SPEC's routing graph: token groups -> routers -> expert pools, with the balancing terms
    (dashed) on the routes they cover, titled with the decoder layers that are MoE layers.

    Read from the spec alone: nothing is built and torch is not imported.

    \b
    Examples:
      moebuild graph micro-ltdr -o routing.svg
      moebuild graph my_model.yaml -o routing.dot && dot -Tpdf routing.dot -o routing.pdf
    """
    from moebuild.graph import FORMATS, write_graph
    from moebuild.spec.loading import load_spec

    if output.suffix.lower() not in FORMATS:
        raise click.ClickException(f"cannot draw to {output}: the extension must be one of {', '.join(FORMATS)}")
    parsed = load_spec(spec, overrides)
    inputs = (Path(spec),) if Path(spec).is_file() else ()
    try:
        _write_file(output, lambda path: write_graph(parsed, path), force, inputs)
    except (ValueError, OSError) as exc:
        raise click.ClickException(f"{spec}: {exc}") from None
    click.echo(f"wrote {output}", err=True)


@main.group()
def bench():
    """Benchmarks, each against transformers in the same process: one MoE layer (moe) or a whole model (model)."""


@bench.command("moe")
@click.option("--experts", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--hidden", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--intermediate", type=click.IntRange(min=1), default=2816, show_default=True)
@click.option("--shared-experts", type=click.IntRange(min=0), default=0, show_default=True,
              help="Width of a shared SwiGLU every token also goes through (0: none).")
@click.option("--tokens", type=click.IntRange(min=1), multiple=True, default=(2048,), show_default=True,
              help="Token count; repeatable.")
@click.option("--backward", is_flag=True, help="Also time forward+backward.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Median of this many.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--skip", multiple=True, metavar="IMPL",
              help='Leave an implementation out, e.g. "transformers eager"; repeatable. The dense baseline stays.')
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_moe_cmd(experts, top_k, hidden, intermediate, shared_experts, tokens, backward, repeats, device, dtype,
                  skip, as_json):
    """Time every moebuild dispatch backend, every transformers experts implementation and a
    dense SwiGLU of the same activated FLOPs, on the same weights and routing, in one process.

    \b
    Examples:
      moebuild bench moe --experts 64 --top-k 6 --intermediate 512 --shared-experts 1024 --backward
      moebuild bench moe --tokens 1 --tokens 32 --json
    """
    if top_k > experts:
        raise click.BadParameter(f"--top-k {top_k} exceeds --experts {experts}", param_hint="--top-k")
    import torch

    from moebuild.bench import MoEConfig, bench_moe, check_skip, format_table, timing_device, to_json

    for hint, check, value in (("--device", timing_device, device), ("--skip", check_skip, skip)):
        try:
            check(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=hint) from None
    cfg = MoEConfig(experts, top_k, hidden, intermediate, shared_experts)
    try:
        results = bench_moe(cfg, list(tokens), backward=backward, repeats=repeats, device=device,
                            dtype=getattr(torch, dtype), skip=tuple(skip))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(to_json(cfg, results, device, getattr(torch, dtype)), indent=2) if as_json
               else format_table(cfg, results))


@main.command()
@click.argument("source", metavar="SPEC_OR_MODEL_DIR")
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="LLaVA-format records (.json list or .jsonl); image paths relative to the file or --image-folder.")
@click.option("--stage", help="Training stage of the spec to run (training.stages); default: train everything.")
@click.option("-o", "--output", required=True, type=_Output(file_okay=False, path_type=Path),
              help="Run directory: checkpoint-<step>/ model directories and log.jsonl.")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True, help="Optimiser steps in all.")
@click.option("--resume", is_flag=True, help="Continue the run in OUTPUT from its last checkpoint.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lr", type=_Finite(min=0, max=1, min_open=True), default=1e-3, show_default=True,
              help="AdamW's learning rate, in (0, 1].")
@click.option("--save-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2), default=1024, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the data order (and of a fresh model).")
@click.option("--image-folder", type=click.Path(file_okay=False, exists=True, path_type=Path))
def train(source: str, data: Path, stage: str | None, output: Path, steps: int, resume: bool, batch_size: int,
          lr: float, save_every: int, log_every: int, max_length: int, seed: int, image_folder: Path | None):
    """Train SPEC_OR_MODEL_DIR (a spec, preset or model directory) for one stage on LLaVA-format data."""
    from transformers.utils import logging as hf_logging

    import moebuild.train as training
    from moebuild.model.pretrained import CheckpointError

    hf_logging.disable_progress_bar()  # moebuild's own bar counts the steps; no shard-writing bars

    settings = training.Settings(stage=stage, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                 save_every=save_every, log_every=log_every, max_length=max_length)
    try:
        model = training.load_model(source, seed)
        found = training.check(model, output, settings, resume)  # refused before the stage's table is printed
        if stage is not None:
            click.echo(str(model.apply_stage(stage)))
        with click.progressbar(length=steps, label="training", show_pos=True,
                               item_show_func=lambda loss: None if loss is None else f"loss {loss:.4f}") as bar:
            def progress(step: int, loss: float) -> None:
                bar.current_item = loss
                bar.update(step - bar.pos)

            run = training.train_checked(model, data, output, settings, resume_from=found[-1] if resume else None,
                                         image_folder=image_folder, progress=progress)
    except (training.TrainError, training.DataError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {output / f'checkpoint-{run.step:06d}'} (step {run.step}); log: {output / 'log.jsonl'}")


@bench.command("model")
@click.argument("spec", metavar="SPEC_OR_PRESET")
@click.option("--against", type=click.Choice(["hf"]), default="hf", show_default=True,
              help="hf: transformers' own model of the architecture (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Training-step batch size.")
@click.option("--length", type=click.IntRange(min=2), default=512, show_default=True,
              help="Training-step sequence length, at most the model's language.max_position_embeddings.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Interleaved samples per model.")
@click.option("--only", multiple=True, metavar="WORKLOAD", help='Time only workloads whose name contains this, e.g. "prefill".')
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_model_cmd(spec, against, overrides, batch, length, repeats, only, as_json):
    """Time a whole model against transformers' implementation of the same architecture, on the
    same weights: a training step, prefill at 128 and 512 tokens, greedy generation and one decode step
    (a workload past the model's positions is a skipped row).

    \b
    Examples:
      moebuild bench model benchmarks/specs/qwen2_moe_like.yaml --against hf
      moebuild bench model benchmarks/specs/deepseek_v3_like.yaml --only prefill --json
    """
    from transformers.utils import logging as hf_logging

    from moebuild.accounting import check_context
    from moebuild.bench_model import bench_model, check_only, format_rows, to_json, workloads
    from moebuild.model.pretrained import CheckpointError
    from moebuild.spec.loading import load_spec

    hf_logging.set_verbosity_error()
    parsed = load_spec(spec, overrides=list(overrides))
    names = workloads(parsed.language.vocab_size, batch, length)
    for hint, check in (("--length", lambda: check_context(parsed, length)), ("--only", lambda: check_only(only, names))):
        try:
            check()
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=hint) from None
    try:
        diff, rows = bench_model(parsed, batch=batch, length=length, repeats=repeats, only=tuple(only))
    except (CheckpointError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(to_json(parsed, diff, rows), indent=2) if as_json else format_rows(parsed, diff, rows))


def _scaled(value: float, units: list[str], base: int) -> str:
    for unit in units[:-1]:
        if abs(value) < base:
            return f"{value:.3g} {unit}".rstrip()
        value /= base
    return f"{value:.3g} {units[-1]}"


def _bytes(n: int) -> str:
    return _scaled(n, ["B", "KiB", "MiB", "GiB", "TiB"], 1024)


def _count(n: int) -> str:
    return _scaled(n, ["", "K", "M", "G", "T"], 1000)


def summary_table(summary) -> str:
    """A `moebuild.accounting.Summary` as aligned plain text, for `moebuild summary` and `moebuild compile`."""
    from moebuild.accounting import PUBLISHED

    rows = [(summary.name, "params", "active")]
    for name, component in summary.components.items():
        rows.append((name, f"{component.total:,}", f"{component.active:,}"))
        rows += [(f"  {part_name}", f"{p.total:,}", f"{p.active:,}") for part_name, p in component.parts.items()]
    rows.append(("total", f"{summary.total_params:,}", f"{summary.active_params:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    memory = " | ".join(f"{dtype} {_bytes(n)}" for dtype, n in summary.memory_bytes().items())
    kv = " | ".join(f"{dtype} {_bytes(n)}" for dtype, n in summary.kv_cache_bytes_per_token().items())
    lines += [
        f"active modality: {summary.active_modality}",
        f"FLOPs per token (context {summary.context}): {_count(summary.flops_per_token)}",
        f"weights: {memory}",
        f"KV cache per token: {kv}",
        summary.counting,
    ]
    for convention in PUBLISHED.values():
        figures = convention.figures(summary)
        lines.append(f"as {convention.system} counts: {_count(figures['total'])} total, "
                     f"{_count(figures['activated'])} activated")
    return "\n".join(lines)


def spec_json_schema() -> dict:
    """JSON Schema of ``ModelSpec`` with ``$schema`` and ``title`` set."""
    from moebuild.schemas import ModelSpec

    body = ModelSpec.model_json_schema()
    return {"$schema": SCHEMA_URI, **body, "title": "moebuild spec"}


@main.command("trace")
@click.argument("model", metavar="MODEL_DIR_OR_SPEC")
@click.option("--data", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help='JSONL file: one {"prompt": "... <image> ...", "image": "path"} per line; image optional, '
                   "relative to the file.")
@click.option("--image", type=click.Path(dir_okay=False, exists=True, path_type=Path), help="One image (with --prompt).")
@click.option("--prompt", help="One prompt; `<image>` marks where the image goes (default: at the start).")
@click.option("-o", "--output", required=True, type=_Output(file_okay=False, path_type=Path),
              help="Directory to write routing.json, the PNG figures and report.html to.")
@click.option("--layer", type=int, help="Decoder layer of the patch maps (default: the first MoE layer).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the initialisation when MODEL is a spec.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if moebuild wrote everything in it.")
def trace_cmd(model: str, data: Path | None, image: Path | None, prompt: str | None, output: Path,
              layer: int | None, batch_size: int, seed: int, force: bool):
    """Run a model over prompts (and images) and draw where its routers sent each token: per MoE layer,
    route and modality, expert loads, dropped slots, router entropy, LTDR's routing-probability
    variance, expert co-activation and per-patch top-1 experts. MODEL is a directory `moebuild
    compile` wrote, or a spec (built with random weights). Writes OUTPUT/routing.json, PNGs and a
    self-contained OUTPUT/report.html; prompts are tokenized by the spec's tokenizer, byte by byte
    when it names none (moebuild.model.tokenizer).

    \b
    Examples:
      moebuild trace out/micro-ltdr --image photo.png --prompt "<image> What is this?" -o out/trace
      moebuild trace micro-moe-llava --data samples.jsonl -o out/trace --layer 2 --batch-size 4
    """
    if (data is None) == (image is None and prompt is None):
        raise click.UsageError("give either --data FILE.jsonl or --prompt TEXT (with --image IMG)")
    if image is not None and prompt is None:
        prompt = ""
    from moebuild.output import OutputError, check_output

    inputs = tuple(Path(p) for p in (model, data, image) if p is not None and Path(p).exists())
    try:
        check_output(output, force, inputs)
    except OutputError as exc:
        raise click.ClickException(str(exc)) from None
    from moebuild.tracing.inputs import InputError, Sample, load_image, read_jsonl

    try:
        samples = read_jsonl(data) if data is not None else [Sample(prompt, None if image is None else load_image(image))]
    except InputError as exc:
        raise click.ClickException(str(exc)) from None
    from transformers.utils import logging as hf_logging

    from moebuild.model.pretrained import CheckpointError

    hf_logging.disable_progress_bar()  # the trace's own bar is the one to watch
    if Path(model).is_dir():
        if _given("seed"):
            raise click.UsageError(f"--seed initialises a model built from a spec; {model} is a model directory "
                                   "with its own weights")
        from moebuild.model.vlm import MoEVLMForConditionalGeneration

        try:
            built = MoEVLMForConditionalGeneration.from_pretrained(model)
        except CheckpointError as exc:  # names the directory itself
            raise click.ClickException(str(exc)) from None
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"{model}: {_first_line(exc)}") from None
    else:
        from moebuild.model.vlm import build
        from moebuild.spec.loading import load_spec

        built = build(load_spec(model), seed=seed)
    built.eval()
    from moebuild.tracing.collect import RoutingTrace, moe_layers, trace
    from moebuild.tracing.report import write_trace_dir

    indices = [index for index, _ in moe_layers(built)]
    if not indices:
        raise click.ClickException(f"{model} has no MoE layer: nothing to trace")
    if layer is not None and layer not in indices:
        raise click.BadParameter(f"layer {layer} is not an MoE layer; choose from {indices}", param_hint="--layer")
    from moebuild.tracing.inputs import batches

    result = RoutingTrace(model_name=built.spec.name)
    pictures = []
    try:
        with click.progressbar(length=len(samples), label="tracing", file=sys.stderr) as bar:
            for batch, batch_images in batches(samples, built, batch_size):
                trace(built, batch, into=result)
                pictures += batch_images
                bar.update(batch["input_ids"].shape[0])
        write_trace_dir(result, pictures, layer, output, force, inputs)
    except (InputError, OutputError, ValueError) as exc:
        raise click.ClickException(_first_line(exc)) from None
    click.echo(f"traced {len(samples)} sample(s), {len(indices)} MoE layer(s); wrote {output} (open report.html)")


if __name__ == "__main__":
    main()
