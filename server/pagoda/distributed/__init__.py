"""Tensor parallelism: the process group, the worker processes, and the collectives the layers call."""
