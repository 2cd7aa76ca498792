"""A synthetic image+text task a micro model learns in a few hundred CPU steps: name the colour of a
solid picture. Writes LLaVA-format data (`data.json`) and the PNGs beside it."""

from __future__ import annotations

import json
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (240, 220, 40),
           "white": (250, 250, 250), "black": (5, 5, 5)}
QUESTION = "<image>\nWhat colour is this?"


def make_colour_task(directory: str | Path, per_colour: int = 4, size: int = 32) -> Path:
    """Write `per_colour` shaded pictures of each colour and their records; returns data.json's path."""
    from PIL import Image

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for name, rgb in COLOURS.items():
        for i in range(per_colour):
            shade = tuple(min(255, max(0, c + 6 * (i - per_colour // 2))) for c in rgb)  # a little variety
            path = Path("images") / f"{name}-{i}.png"
            Image.new("RGB", (size, size), shade).save(directory / path)
            records.append({"image": str(path), "conversations": [{"from": "human", "value": QUESTION},
                                                                  {"from": "gpt", "value": name}]})
    (directory / "data.json").write_text(json.dumps(records, indent=1) + "\n")
    return directory / "data.json"
