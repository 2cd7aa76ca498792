"""The torch-free front end: YAML with positions, base: inheritance, overrides, references, located errors, presets."""
