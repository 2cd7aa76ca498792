"""The MoE vision-language model: a transformers PreTrainedModel that trains and generates.

Layout follows LLaVA (Liu et al. 2023) as MoE-LLaVA and DeepSeek-VL2 use it: a vision tower, a
connector, and a decoder whose input embeddings at the image placeholder tokens are replaced by
the connector's output. The decoder's MoE layers learn each token's modality from the same
placeholder mask, passed down the forward call (as transformers' ernie4_5_vl_moe passes
`moe_mm_token_type_ids`), never through global state.

`build` makes one from a spec (the public `moebuild.build`), `build_and_save` writes it safely.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.utils import ModelOutput

from moebuild.model.compat import CACHE_NAME
from moebuild.model.config import MoEVLMConfig
from moebuild.model.inputs import InputRules, check_inputs
from moebuild.model.tiling import TiledConnector, tiled_token_count
from moebuild.moe.batch import IMAGE, TEXT
from moebuild.moe.experts import ExpertPool
from moebuild.moe.routers.base import DTYPES, Router, init_router
from moebuild.registry import build_components
from moebuild.schemas import ModelSpec
from moebuild.spec.errors import BuildError


@dataclass
class MoEVLMOutput(ModelOutput):
    """Model output. `loss` = `lm_loss` + every balancing term; each term is also in `aux_losses`.

    `cache` is the KV cache (transformers >= 5.24's name); with older transformers it is also
    under `past_key_values`, where their `generate` looks for it."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    lm_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    router_stats: list | None = None

    def __post_init__(self):
        super().__post_init__()
        if CACHE_NAME != "cache" and self.cache is not None:
            self[CACHE_NAME] = self.cache


def init_custom_weights(module: nn.Module, std: float) -> bool:
    """Initialise the modules transformers' `_init_weights` does not know; True when handled.

    transformers' `initialization` functions skip tensors already loaded by from_pretrained.
    """
    from transformers import initialization as init

    if isinstance(module, ExpertPool):
        for name, param in module.named_parameters(recurse=False):
            # an expert-parallel rank draws the whole pool and keeps its slice: the single process's init
            full = param if module.parallel is None else param.new_empty(module.num_experts, *param.shape[1:])
            init.zeros_(full) if name.endswith("_bias") else init.normal_(full, std=std)
            if module.upcycle:
                # Upcycling (Komatsuzaki et al. 2023; MoE-LLaVA): every expert a copy of one FFN.
                full = full[:1].expand_as(full).clone()
            if full is not param:
                init.copy_(param, full[module.first_expert:module.first_expert + module.num_local_experts])
        return True
    if isinstance(module, Router):
        init_router(module, init.normal_, init.zeros_)
        return True
    if isinstance(module, TiledConnector):
        for param in (module.image_newline, module.view_separator):
            if param is not None:  # DeepSeek-VL2 draws both from N(0, 1 / hidden_size)
                init.normal_(param, std=param.shape[-1] ** -0.5)
        return True
    return False


class MoEVLMPreTrainedModel(PreTrainedModel):
    config_class = MoEVLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["DecoderLayer"]  # a block and its experts stay on one device
    # With `tie_word_embeddings`, transformers re-ties these after to_empty, loading and saving.
    _tied_weights_keys = {"language.lm_head.weight": "language.model.embed_tokens.weight"}

    @torch.no_grad()
    def _init_weights(self, module):
        if not init_custom_weights(module, std=0.02):
            super()._init_weights(module)


class MoEVLMForConditionalGeneration(MoEVLMPreTrainedModel, GenerationMixin):
    """Vision tower -> connector -> MoE decoder -> LM head, built from `config.spec`."""

    def __init__(self, config: MoEVLMConfig):
        super().__init__(config)
        self.vision, self.connector, self.language = build_components(config.parsed_spec, config.text_config)
        # The nested transformers towers marked themselves initialised when they were built; forget
        # that, so from_pretrained re-creates their non-persistent buffers (CLIP's position_ids).
        for tensor_or_module in (*self.modules(), *self.parameters(), *self.buffers()):
            tensor_or_module.__dict__.pop("_is_hf_initialized", None)
        self.post_init()

    def cast_weights(self, dtype: torch.dtype) -> None:
        """Parameters and floating buffers in `dtype` (the decoder's exceptions: LanguageModel.cast_weights)."""
        for part in (self.vision, self.connector):
            if part is not None:
                part.to(dtype)
        self.language.cast_weights(dtype)

    @property
    def spec(self) -> ModelSpec:
        return self.config.parsed_spec

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens one untiled view takes in `input_ids` (a tiled picture's count comes from the
        processor); 0 for a text-only model."""
        return 0 if self.vision is None else self.connector.num_output_tokens(self.vision.num_tokens)

    @cached_property
    def input_rules(self) -> InputRules:
        spec = self.spec
        return InputRules(spec.language.vocab_size, spec.language.hidden_size, spec.image_token_id,
                          None if spec.text_only else spec.vision.image_size, self.num_image_tokens)

    def prepare_inputs_for_generation(self, *args, pixel_values=None, image_grids=None, is_first_iteration=False,
                                      **kwargs):
        """Pictures go in with the prompt only (as transformers' LLaVA does): decode steps read the cache."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            inputs.update(pixel_values=pixel_values, image_grids=image_grids)
        return inputs

    def get_input_embeddings(self):
        return self.language.embed_tokens

    def set_input_embeddings(self, value):
        self.language.embed_tokens = value

    def get_output_embeddings(self):
        return self.language.lm_head

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Views [V, 3, H, W] -> language-space embeddings [V, P, H], one token sequence per view."""
        return self.connector(self.vision(pixel_values.to(self.dtype)))

    def image_embeddings(self, pixel_values: torch.Tensor, image_grids=None) -> torch.Tensor:
        """Every picture's tokens in sequence order, [T, H].

        Without `image_grids` each view is one picture. With them (the processor's `tile_grids`:
        (columns, rows) of local tiles per picture), a tiled spec's connector lays each picture's
        global view and tiles out with newlines and the view separator (DeepSeek-VL2).
        """
        features_VPH = self.image_features(pixel_values)
        if image_grids is None:
            return features_VPH.reshape(-1, features_VPH.shape[-1])
        return self._tiled_connector().arrange(features_VPH, image_grids)

    def _tiled_connector(self) -> TiledConnector:
        """The connector, for inputs that come with `image_grids`."""
        if not isinstance(self.connector, TiledConnector):
            raise ValueError("image_grids are for tiled images; this spec has no vision.tiling")
        return self.connector

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and num_return_sequences repeat every sample `expand_size` times. transformers
        repeats each tensor row by row, but `pixel_values` holds views and `image_grids` pictures,
        not samples: they are repeated here as each sample's whole group, in sample order."""
        pixel_values, image_grids = model_kwargs.pop("pixel_values", None), model_kwargs.pop("image_grids", None)
        if pixel_values is not None and expand_size > 1 and input_ids is not None:
            pixel_values, image_grids = self._repeat_pictures(input_ids, pixel_values, image_grids, expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        return input_ids, {**model_kwargs, "pixel_values": pixel_values, "image_grids": image_grids}

    def _repeat_pictures(self, input_ids, pixel_values, image_grids, times: int):
        """(pixel_values, image_grids) with each sample's pictures repeated `times` times in a row;
        which pictures are a sample's follows from its image placeholder count."""
        per_view = self.num_image_tokens
        if image_grids is None:
            views, tokens = [1] * pixel_values.shape[0], [per_view] * pixel_values.shape[0]
        else:
            tiled = self._tiled_connector()
            views = tiled.views_per_picture(image_grids)
            side = math.isqrt(per_view)
            tokens = [tiled_token_count(side, (int(c), int(r)), tiled.global_view) for c, r in image_grids]
        view_start = [0, *itertools.accumulate(views)]
        repeated_views, repeated_grids, picture = [], [], 0
        for sample_tokens in (input_ids == self.config.image_token_id).sum(dim=1).tolist():
            first = picture
            while sample_tokens > 0 and picture < len(tokens):
                sample_tokens -= tokens[picture]
                picture += 1
            if sample_tokens != 0:
                raise ValueError("input_ids' image tokens do not split into the given pictures sample by sample")
            repeated_views += [pixel_values[view_start[first]:view_start[picture]]] * times
            if image_grids is not None:
                repeated_grids += list(image_grids[first:picture]) * times
        if picture != len(tokens):
            raise ValueError(f"input_ids hold image tokens for {picture} image(s) but {len(tokens)} were given")
        return torch.cat(repeated_views), (repeated_grids if image_grids is not None else None)

    def merge_image_features(self, input_ids, inputs_embeds, pixel_values, image_grids=None):
        """Put the pictures' embeddings at the image placeholder tokens, in order."""
        is_image_BS = input_ids == self.config.image_token_id
        if pixel_values is None or not is_image_BS.any():
            return inputs_embeds
        features_TH = self.image_embeddings(pixel_values, image_grids)
        if is_image_BS.sum().item() != features_TH.shape[0]:
            if image_grids is None:
                pictures = pixel_values.shape[0]
                detail = f"({features_TH.shape[0] // pictures} per image)"
            else:
                pictures = len(image_grids)
                detail = "(tiled " + ", ".join(f"{int(c)}x{int(r)}" for c, r in image_grids) + ")"
            raise ValueError(
                f"input_ids hold {int(is_image_BS.sum())} image tokens but {pictures} image(s) "
                f"give {features_TH.shape[0]} features {detail}"
            )
        return inputs_embeds.masked_scatter(is_image_BS.unsqueeze(-1), features_TH.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        modality: torch.LongTensor | None = None,
        image_grids=None,
        output_router_stats: bool = False,
        output_aux_losses: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values=None,
        **kwargs,
    ) -> MoEVLMOutput:
        """`modality` [B, S] (0 text, 1 image) is derived from the placeholder tokens when omitted;
        `image_grids` are the processor's `tile_grids` for a tiled spec (see `image_embeddings`).
        `past_key_values` is the KV cache under the name transformers < 5.24 pass it by.
        `output_aux_losses`: compute the balancing terms (`aux_losses`, and their share of `loss`);
        None = when training or when labels are given, so generation computes none."""
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        check_inputs(self.input_rules, input_ids, inputs_embeds, pixel_values, attention_mask, labels, past)
        if inputs_embeds is None:
            inputs_embeds = self.language.embed_tokens(input_ids)
            if pixel_values is not None:
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, pixel_values, image_grids)
        if modality is None and input_ids is not None and self.vision is not None:
            # a placeholder id sampled in a decode step is a text token: no picture stands behind it
            is_image_BS = input_ids == self.config.image_token_id if pixel_values is not None else input_ids < 0
            modality = torch.where(is_image_BS, IMAGE, TEXT)
        out = self.language(
            inputs_embeds,
            attention_mask_BS=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache if use_cache is not None else not self.training,
            modality_BS=modality,
            output_router_stats=output_router_stats,
            output_aux_losses=self.training or labels is not None if output_aux_losses is None else output_aux_losses,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.language.lm_head(hidden)
        lm_loss = loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = lm_loss + sum(out.aux_losses.values(), torch.zeros((), device=lm_loss.device))
        return MoEVLMOutput(
            loss=loss,
            logits=logits,
            cache=out.cache,
            lm_loss=lm_loss,
            aux_losses=out.aux_losses,
            router_stats=out.router_stats if output_router_stats else None,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """A model directory moebuild wrote (or one like it), loaded strictly: config.json must be there,
        weights are read from safetensors only, and every missing, unexpected or mis-shaped tensor is
        named in one CheckpointError (a ValueError) instead of leaving random weights behind a warning."""
        from moebuild.model.pretrained import CheckpointError
        from moebuild.spec.loading import PICKLES_REFUSED

        directory = Path(pretrained_model_name_or_path)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: not a local model directory")
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"{directory}: no config.json (a model directory holds config.json, spec.yaml "
                                  "and model.safetensors)")
        spec, config = _read_moebuild_config(directory)
        try:
            check_memory(spec, _loading_dtype(config, kwargs), torch.device("cpu"))  # before anything is allocated
        except BuildError as exc:
            raise CheckpointError(str(exc)) from None
        expert_parallel = kwargs.pop("expert_parallel", None)
        if expert_parallel is not None or "config" not in kwargs:
            sharded = cls._from_pretrained_expert_parallel(directory, expert_parallel, kwargs)
            if sharded is not None:
                return (sharded, {}) if kwargs.get("output_loading_info") else sharded
        wants_info = kwargs.pop("output_loading_info", False)
        kwargs["use_safetensors"] = True  # never a pickle
        kwargs.setdefault("ignore_mismatched_sizes", True)  # reported below, with the other misfits
        try:
            with _quiet_transformers():  # its LOAD REPORT table; the misfits are named below, in one line
                model, info = super().from_pretrained(directory, *args, output_loading_info=True, **kwargs)
        except SafetensorError as exc:
            raise CheckpointError(f"{directory}: not a readable safetensors file ({exc})") from None
        except OSError:
            if not any(directory.glob("*.safetensors")):
                pickles = any(directory.glob("*.bin")) or any(directory.glob("*.pt"))
                why = PICKLES_REFUSED if pickles else "a `moebuild compile --device meta` directory holds the config and spec only"
                raise CheckpointError(f"{directory}: no model.safetensors ({why})") from None
            raise
        misfits = {
            "missing": sorted(info.get("missing_keys") or ()),
            "unexpected": sorted(info.get("unexpected_keys") or ()),
            "mis-shaped": sorted(f"{k} (checkpoint {tuple(a)}, model {tuple(b)})"
                                 for k, a, b in info.get("mismatched_keys") or ()),
        }
        problems = [f"{label}: {', '.join(keys)}" for label, keys in misfits.items() if keys]
        if problems:
            raise CheckpointError(f"{directory / 'model.safetensors'} does not fit its spec; " + "; ".join(problems))
        return (model, info) if wants_info else model

    @classmethod
    def _from_pretrained_expert_parallel(cls, directory, expert_parallel: int | None, kwargs: dict):
        """Under expert parallelism (the config's `moe.parallel`, or `expert_parallel=N`): the model
        built for this rank and filled with its experts' slices only. For N = 1, None, with
        `kwargs["config"]` set to the config at N = 1 where the checkpoint's says otherwise."""
        from moebuild.parallel.checkpoint import load_expert_parallel, with_expert_parallel

        config = MoEVLMConfig.from_pretrained(directory)
        spec = config.parsed_spec
        stored = spec.moe.parallel.expert_parallel if spec.moe is not None else 1
        n = stored if expert_parallel is None else expert_parallel
        if n == 1:
            if stored != 1:
                kwargs["config"] = MoEVLMConfig(spec=with_expert_parallel(spec, 1).model_dump(mode="json"))
            return None
        spec = with_expert_parallel(spec, n, source=f"{directory}: expert_parallel")
        if expert_parallel is None:  # the checkpoint's own N: its world-size error names the checkpoint
            from moebuild.parallel.expert import ExpertParallel

            ExpertParallel.join(n, source=f"{directory / 'config.json'}: moe.parallel.expert_parallel")
        model = build(spec, device=kwargs.get("device_map"), dtype=kwargs.get("dtype"), expert_parallel=n)
        load_expert_parallel(model, directory)
        return model.eval()

    def write_spec(self, directory) -> None:
        """Write the resolved spec as `spec.yaml`: the model's definition, readable and re-loadable."""
        from pathlib import Path

        from moebuild.spec.loading import dump_yaml

        (Path(directory) / "spec.yaml").write_text(dump_yaml(self.config.spec))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Under expert parallelism every rank must call it: the pools are gathered and world rank 0 writes
        the files a single process writes (moebuild/parallel/checkpoint.py)."""
        from moebuild.parallel.checkpoint import expert_parallel_of, gathered_state_dict, single_process_config

        parallel = expert_parallel_of(self)
        if parallel is None:
            super().save_pretrained(save_directory, *args, **kwargs)
            self.write_spec(save_directory)
            return
        import torch.distributed as dist

        state = gathered_state_dict(self)
        if dist.get_rank() == 0:
            with single_process_config(self):
                super().save_pretrained(save_directory, *args, state_dict=state, **kwargs)
                self.write_spec(save_directory)
        dist.barrier()

    @torch.no_grad()
    def update_balancing(self) -> None:
        """Call after each optimiser step (or add `moebuild.moe.BalancingCallback` to a Trainer): moves
        aux-loss-free correction biases by the loads counted since the last call, advances top-k curricula."""
        from moebuild.moe.layer import MoELayer

        for module in self.modules():
            if isinstance(module, MoELayer):
                module.update_balancing()

    def apply_stage(self, stage: str):
        """Freeze everything but the stage's `trainable` patterns; a `StageCounts` of trainable and
        frozen parameters per component (vision, connector, language, moe)."""
        from moebuild.model.training import apply_stage

        return apply_stage(self, stage)

    def trainable_for_stage(self, stage: str) -> dict[str, int]:
        """`apply_stage(stage).trainable`: trainable counts per component."""
        return self.apply_stage(stage).trainable


def _read_moebuild_config(directory: Path) -> tuple[ModelSpec, dict]:
    """`directory`'s config.json and its spec; a CheckpointError unless it is a moebuild model's whose
    fields agree with that spec (the spec alone decides what is built)."""
    import json

    from moebuild.model.config import derived_fields, disagreements
    from moebuild.model.pretrained import CheckpointError, validated_spec
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "moebuild" or not isinstance(config.get("spec"), dict):
        found = f"a {kind!r} checkpoint" if kind not in (None, "moebuild") else "no moebuild spec in its config.json"
        raise CheckpointError(f"{directory}: not a moebuild model directory ({found}; `moebuild import` converts "
                              "released checkpoints)")
    spec = validated_spec(config["spec"], str(path))
    differ = disagreements(derived_fields(spec), config)
    if differ:
        raise CheckpointError(f"{path} disagrees with its own spec: {differ}")
    return spec, config


def _loading_dtype(config: dict, kwargs: dict) -> torch.dtype:
    """The dtype `from_pretrained` will allocate in: the caller's, else the checkpoint's, else float32."""
    wanted = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if wanted in (None, "auto"):
        wanted = config.get("dtype") or "float32"
    return getattr(torch, wanted) if isinstance(wanted, str) else wanted


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def build(spec, device=None, dtype=None, seed: int | None = None,
          expert_parallel: int | None = None) -> MoEVLMForConditionalGeneration:
    """A `MoEVLMForConditionalGeneration` from a spec, a preset name or a spec file.

    The model is built on the meta device, cast to `dtype` there (the rotary tables stay fp32, as
    in transformers), then allocated on `device` and initialised: no process-wide default dtype is
    set and, with a `seed`, the global RNG is left as it was. On `device="meta"` nothing is
    allocated (and no pretrained weights are read). Routers still compute in their spec'd precision.
    `expert_parallel=N` overrides the spec's `moe.parallel.expert_parallel`: each of the N processes of
    the torch.distributed world builds its E/N experts of every pool (initialised, with a seed, as the
    single-process model's experts: the same draws, sliced).
    """
    from moebuild.model.pretrained import load_pretrained_parts
    from moebuild.spec.loading import load_spec

    if not isinstance(spec, ModelSpec):
        spec = load_spec(spec)
    if expert_parallel is not None:
        from moebuild.parallel.checkpoint import with_expert_parallel

        spec = with_expert_parallel(spec, expert_parallel)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or torch.float32
    device = torch.device(device or "cpu")
    if device.type != "meta":
        check_memory(spec, dtype, device)
    with torch.device("meta"):
        model = MoEVLMForConditionalGeneration(MoEVLMConfig(spec=spec.model_dump(mode="json")))
    model.cast_weights(dtype)
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
        if seed is not None:  # the generators the init draws from, and no other (manual_seed seeds every GPU)
            torch.random.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
        model.init_weights()
    load_pretrained_parts(model, spec)
    return model


def check_memory(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before allocating, a model whose weights alone (this rank's share under expert
    parallelism) exceed the memory available."""
    from moebuild.accounting import params_per_rank
    from moebuild.model.memory_budget import available_bytes

    needed = params_per_rank(spec) * dtype.itemsize  # an expert-parallel rank holds E/N experts
    available = available_bytes(device)
    if available is not None and needed > available:
        raise BuildError(
            f"{spec.name} needs {needed / 2**30:.1f} GiB for its weights in {str(dtype).removeprefix('torch.')} "
            f"but {available / 2**30:.1f} GiB of {device.type} memory is available; build it on "
            "device='meta' (moebuild compile --device meta) to inspect it without allocating"
        )


def build_and_save(spec: ModelSpec, output, *, device="cpu", dtype=None, seed=None, force: bool = False) -> None:
    """Build and save to `output` (see moebuild.output: staged, renamed at the end, and never
    deleting what moebuild did not write; `force` replaces a model moebuild wrote there)."""
    from pathlib import Path

    from moebuild.output import write_model_dir

    def write(directory: Path) -> None:
        model = build(spec, device=device, dtype=dtype, seed=seed)
        if device == "meta":
            model.config.save_pretrained(directory)
            model.write_spec(directory)
        else:
            model.save_pretrained(directory)

    write_model_dir(Path(output), write, force=force)


def causal_lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in fp32, positions labelled -100 ignored."""
    shift_logits = logits_BSV[:, :-1].float().reshape(-1, logits_BSV.shape[-1])
    shift_labels = labels_BS[:, 1:].reshape(-1).to(logits_BSV.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


AutoConfig.register(MoEVLMConfig.model_type, MoEVLMConfig, exist_ok=True)
AutoModel.register(MoEVLMConfig, MoEVLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(MoEVLMConfig, MoEVLMForConditionalGeneration, exist_ok=True)
