"""LTDR checkpoints: MoE-LLaVA's (`moebuild.convert.moe_llava` reads and writes them; LTDR changes
only how image tokens are routed, which a spec's image route says), with refusals that name LTDR."""

from __future__ import annotations

from functools import partial

from . import moe_llava

SYSTEM = "LTDR"
COMPANIONS = moe_llava.COMPANIONS
spec_from_config = partial(moe_llava.spec_from_config, system=SYSTEM)
to_moebuild = partial(moe_llava.to_moebuild, system=SYSTEM)
from_moebuild = partial(moe_llava.from_moebuild, system=SYSTEM)
untranslated = moe_llava.untranslated
