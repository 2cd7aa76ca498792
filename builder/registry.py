"""THE registry: every spec class -> what builds it. `build_module(node, **context)` looks a node up
in `REGISTRY`, so any single node (one MoE layer for a given hidden size, a connector, a router)
can be built alone for tests and benchmarks.

A leaf node is built by its module class's `from_spec(node, **context)`; a composite node (the
decoder, an MoE layer) by a function here that builds its children and hands them to the module,
as torchtune's `MoE(experts=, router=)` receives its parts. Modules take plain typed arguments;
only `from_spec` and the functions here read spec objects. Adding a router type, balancing term
or pool type is one schema class (schemas/), one module class with `from_spec`, and one line
here; tests/test_registry.py checks that every member of the schema's unions has its line.
`build_processor` is here too; `moebuild.build` (the whole model) is in model/vlm.py, which this
module never imports. (The module is not named build.py: `moebuild.build` is the public function.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from moebuild.model.connectors import (
    DownsampleMLPConnector,
    LinearConnector,
    MLPConnector,
)
from moebuild.model.language import LanguageModel, make_hf_config
from moebuild.model.tiling import TiledConnector
from moebuild.model.vision import VisionTower
from moebuild.moe.balancing import (
    BiasBalancing,
    Entropy,
    LoadBalance,
    SeqAux,
    SwitchAux,
    ZLoss,
)
from moebuild.moe.experts import ExpertPool
from moebuild.moe.layer import MoELayer, Route
from moebuild.moe.routers.contextual import ContextRouter, QueryRouter
from moebuild.moe.routers.deepspeed import DeepSpeedTop2Router
from moebuild.moe.routers.dynamic import DynamicTopKRouter, ThresholdRouter
from moebuild.moe.routers.expert_choice import ExpertChoiceRouter
from moebuild.moe.routers.hierarchical import HierarchicalRouter, ModalityMixRouter
from moebuild.moe.routers.soft import SoftRouter
from moebuild.moe.routers.topk import DenseRouter, TopKRouter
from moebuild.parallel.expert import ExpertParallel
from moebuild.schemas import (
    AuxFreeBiasSpec,
    ClipVisionSpec,
    ContextRouterSpec,
    DeepSpeedTop2RouterSpec,
    DenseRouterSpec,
    DownsampleMLPConnectorSpec,
    DynamicTopKRouterSpec,
    EntropySpec,
    ExpertChoiceRouterSpec,
    HierarchicalRouterSpec,
    LanguageSpec,
    LinearConnectorSpec,
    LoadBalanceSpec,
    MLPConnectorSpec,
    ModalityMixRouterSpec,
    ModelSpec,
    MoESpec,
    PoolSpec,
    QueryRouterSpec,
    SeqAuxSpec,
    SiglipVisionSpec,
    SoftRouterSpec,
    SwitchAuxSpec,
    ThresholdRouterSpec,
    TopKRouterSpec,
    ZLossSpec,
    moe_layer_indices,
)


def language_hf_config(node: LanguageSpec):
    """The transformers config of the language family, from the spec's numbers."""
    extras = {} if node.hidden_act is None else {"hidden_act": node.hidden_act}
    return make_hf_config(
        node.type,
        hidden_size=node.hidden_size,
        num_layers=node.num_layers,
        num_heads=node.num_heads,
        num_kv_heads=node.num_kv_heads,
        intermediate_size=node.intermediate_size,
        vocab_size=node.vocab_size,
        head_dim=node.head_dim,
        attention=node.attention.model_dump(),
        rope_theta=node.rope_theta,
        rope_scaling=None if node.rope_scaling is None else node.rope_scaling.rope_parameters(node.rope_theta),
        partial_rotary_factor=node.partial_rotary_factor,
        max_position_embeddings=node.max_position_embeddings,
        norm_eps=node.norm_eps,
        qkv_bias=node.qkv_bias,
        tie_word_embeddings=node.tie_word_embeddings,
        **extras,
    )


def build_language(node: LanguageSpec, *, moe: MoESpec | None = None, hf_config=None) -> LanguageModel:
    """The decoder, with an MoE layer in place of the FFN of every layer `moe.layers` names."""
    hf_config = hf_config or language_hf_config(node)
    moe_layers = set() if moe is None else set(moe_layer_indices(moe.layers, node.num_layers))
    return LanguageModel(
        hf_config,
        node.type,
        lambda i: build_module(moe, hidden_size=node.hidden_size) if i in moe_layers else None,
        lm_head_bias=node.lm_head_bias,
    )


def build_moe(node: MoESpec, *, hidden_size: int) -> MoELayer:
    """One MoE layer: its pools, its routes (each router sized to its pool) and its balancing terms."""
    backend = node.dispatch.backend
    parallel = ExpertParallel.join(node.parallel.expert_parallel)
    pools = {name: build_module(pool, hidden_size=hidden_size, backend=backend,
                                parallel=None if name in node.parallel.replicate else parallel)
             for name, pool in node.pools.items()}
    routes = [
        Route(build_module(route.router, hidden_size=hidden_size, num_experts=node.pools[route.pool].num_experts),
              route.pool, tokens=route.tokens)
        for route in node.routes
    ]
    terms = [build_module(term) for term in node.balancing]
    updates = node.router_bias_updates()
    if updates:  # `bias: {update_rate}` on routers: one bias term over the tokens those routes see
        tokens = {t for _, t in updates}
        terms.append(BiasBalancing(updates[0][0], tokens=tokens.pop() if len(tokens) == 1 else "all"))
    return MoELayer(routes, terms, pools, parallel)


REGISTRY: dict[type, Callable[..., Any]] = {
    # components
    ClipVisionSpec: VisionTower.from_spec,
    SiglipVisionSpec: VisionTower.from_spec,
    LinearConnectorSpec: LinearConnector.from_spec,
    MLPConnectorSpec: MLPConnector.from_spec,
    DownsampleMLPConnectorSpec: DownsampleMLPConnector.from_spec,
    LanguageSpec: build_language,
    MoESpec: build_moe,
    # expert pools
    PoolSpec: ExpertPool.from_spec,
    # routers
    TopKRouterSpec: TopKRouter.from_spec,
    DenseRouterSpec: DenseRouter.from_spec,
    DeepSpeedTop2RouterSpec: DeepSpeedTop2Router.from_spec,
    ExpertChoiceRouterSpec: ExpertChoiceRouter.from_spec,
    SoftRouterSpec: SoftRouter.from_spec,
    ThresholdRouterSpec: ThresholdRouter.from_spec,
    DynamicTopKRouterSpec: DynamicTopKRouter.from_spec,
    HierarchicalRouterSpec: HierarchicalRouter.from_spec,
    ModalityMixRouterSpec: ModalityMixRouter.from_spec,
    ContextRouterSpec: ContextRouter.from_spec,
    QueryRouterSpec: QueryRouter.from_spec,
    # balancing terms
    SwitchAuxSpec: SwitchAux.from_spec,
    LoadBalanceSpec: LoadBalance.from_spec,
    SeqAuxSpec: SeqAux.from_spec,
    EntropySpec: Entropy.from_spec,
    ZLossSpec: ZLoss.from_spec,
    AuxFreeBiasSpec: BiasBalancing.from_spec,
}


def build_module(node, **context):
    """Build one spec node; a plain dict is read as the `moe` section.

    >>> layer = build_module({"pools": {...}, "routes": [...]}, hidden_size=64)
    """
    if isinstance(node, dict):
        node = MoESpec.model_validate(node)
    try:
        builder = REGISTRY[type(node)]
    except KeyError:
        raise TypeError(f"no build function for {type(node).__name__}; known: {', '.join(c.__name__ for c in REGISTRY)}") from None
    return builder(node, **context)


def build_components(spec: ModelSpec, text_config=None) -> tuple[VisionTower | None, nn.Module | None, LanguageModel]:
    """Vision tower, connector and language model of a spec (random init, current default device); a
    text-only spec has neither tower nor connector."""
    language = build_language(spec.language, moe=spec.moe, hf_config=text_config)
    if spec.text_only:
        return None, None, language
    vision = build_module(spec.vision)
    connector = build_module(spec.connector, in_dim=vision.hidden_size, out_dim=spec.language.hidden_size)
    if spec.vision.tiling is not None:
        # DeepSeek-VL2 keeps image_newline / view_separator beside its projector: they are the connector's.
        connector = TiledConnector(connector, spec.language.hidden_size, global_view=spec.vision.tiling.global_view)
    return vision, connector, language


def tile_token_side(spec: ModelSpec) -> int:
    """Tokens along one side of a view after the connector (27 patches, 2x2 merge -> 14)."""
    factor = spec.connector.factor if isinstance(spec.connector, DownsampleMLPConnectorSpec) else 1
    return math.ceil(spec.vision.image_size // spec.vision.patch_size / factor)


def build_processor(spec):
    """The image processor matching a spec's tower, connector and tiling."""
    from moebuild.model.processing import (
        TOWER_NORMALIZATION,
        TiledImageProcessor,
        build_image_processor,
    )

    if not isinstance(spec, ModelSpec):
        from moebuild.spec.loading import load_spec

        spec = load_spec(spec)
    if spec.text_only:
        raise ValueError(f"{spec.name} is a text-only model (no vision section): it has no image processor")
    vision = spec.vision
    token_side = tile_token_side(spec)
    if vision.tiling is not None:
        mean, std = TOWER_NORMALIZATION[vision.type]
        tiling = vision.tiling
        return TiledImageProcessor(
            tiling.tile_size,
            tile_token_side=token_side,
            max_tiles=tiling.max_tiles,
            max_images=tiling.max_images,
            global_view=tiling.global_view,
            image_mean=mean,
            image_std=std,
        )
    tokens = token_side**2 + (vision.select_feature == "cls_patch")
    return build_image_processor(vision.type, image_size=vision.image_size, tokens_per_image=tokens)
