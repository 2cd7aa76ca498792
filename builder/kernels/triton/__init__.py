"""The Triton dispatch kernels (kernels.py) and their launchers (dispatch.py); imported on first use only."""
