"""The vision-language model: its config, the VLM, the language decoder, the vision tower, connectors,
tiling and image processing, input checks, checkpoint loading and training stages."""
