"""The directory `moebuild trace` writes: routing.json, the figures as PNGs, and report.html, one
self-contained page (every figure embedded as a base64 data URI, so it opens offline).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

CAPTIONS = {
    "load_heatmap": "Expert load per layer and route (rows) and expert (columns): each expert's share of the "
                    "kept assignments, for text and for image tokens. An even row is a balanced layer.",
    "load_distribution": "Expert loads of each layer sorted high to low, per modality. A steep fall is a long "
                         "tail: a few experts take most tokens. The dashed line is a uniform load.",
    "rpv_histogram": "Routing-probability variance (RPV) of text vs image tokens per layer. LTDR routes tokens "
                     "above the threshold (red dashed: the route's mean RPV) to more experts.",
    "coactivation": "Experts (node area ~ load) linked by how many tokens kept both (edge width ~ count).",
    "patch_map": "Top-1 expert of each image patch at layer {layer}, over the image.",
}


def figure_files(trace, images, layer: int | None, directory: Path) -> list[tuple[str, str]]:
    """Write every figure into `directory`; (file name, caption) in page order."""
    written = []
    for name in ("load_heatmap", "load_distribution", "rpv_histogram", "coactivation"):
        getattr(trace, f"plot_{name}")(directory / f"{name}.png")
        written.append((f"{name}.png", CAPTIONS[name]))
    layer = trace.layer_indices()[0] if layer is None else layer
    names = [f"patch_map_{i}.png" for i in range(len(trace.images))]
    trace.plot_patch_maps(images, layer, [directory / n for n in names])
    written += [(n, CAPTIONS["patch_map"].format(layer=layer)) for n in names]
    return written


def render_html(title: str, figures: list[tuple[str, str]], directory: Path) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:0.9em}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
        "<p>Numbers behind every figure: routing.json.</p>",
    ]
    for name, caption in figures:
        data = base64.b64encode((directory / name).read_bytes()).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
                     f"<figcaption><b>{html.escape(name)}</b>: {html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_trace_dir(trace, images, layer: int | None, output: Path, force: bool = False, inputs=()) -> None:
    """Write routing.json, the PNGs and report.html to `output`, staged and renamed into place
    (moebuild.output: never a half-written directory, --force replaces only what moebuild wrote,
    and never the `inputs` the trace read)."""
    from moebuild.output import write_model_dir

    def write(directory: Path) -> None:
        (directory / "routing.json").write_text(trace.to_json() + "\n")
        figures = figure_files(trace, images, layer, directory)
        title = f"Routing of {trace.model_name or 'the model'}"
        (directory / "report.html").write_text(render_html(title, figures, directory))

    write_model_dir(output, write, force, inputs)
