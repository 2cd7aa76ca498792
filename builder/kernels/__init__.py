"""Expert dispatch kernels, each beside the pure-PyTorch reference it must equal.

All share `fn(x_TD, weights_TK, ids_TK, pool) -> y_TD`; Triton is imported only inside its own
module, lazily, so CPU installs never need it.
"""
