"""Checkpoint formats of other systems, converted to and from moebuild model directories.

One module per format. Each module provides three functions over plain data (no files):

    spec_from_config(config: dict, *, name: str) -> dict
        the moebuild spec (plain dict) of an original `config.json`
    to_moebuild(state: dict[str, Tensor], spec: ModelSpec) -> dict[str, Tensor]
        the original tensor names -> moebuild's state dict; total: every missing, left-over or
        mis-shaped tensor is named in one CheckpointError
    from_moebuild(state: dict[str, Tensor], spec: ModelSpec) -> tuple[dict, dict[str, Tensor]]
        the reverse: (the original `config.json`, the original tensor names)
"""
