"""Routing traces: what a model's routers decided over some inputs, as numbers and figures.

`trace(model, batch) -> RoutingTrace` (collect.py), its figures (plots.py), the inputs of
`moebuild trace` (inputs.py: a JSONL file or one image and prompt, tokenized and batched) and the
output directory it writes (report.py: routing.json, PNGs, a self-contained report.html).
"""

from moebuild.tracing.collect import RoutingTrace, trace

__all__ = ["RoutingTrace", "trace"]
