"""Triton kernels of the ``triton`` backend (importing this package imports triton)."""
