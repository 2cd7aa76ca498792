"""Expert dispatch kernels, each beside the pure-PyTorch reference it must equal.

reference.py: the per-expert loop (ground truth); torch_sorted.py: the sort-based CPU path;
triton/ (kernels.py, dispatch.py): the Triton kernels and their launchers; ops.py: the
custom-op wrapping (fake kernels, autograd) and the sort metadata both fast paths share;
memory.py: huge-page-backed CPU buffers for the torch path's large per-call tensors.
Triton is imported only by triton/, on first use of the "triton" backend.
"""
