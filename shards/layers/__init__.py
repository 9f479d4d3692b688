"""Tensor-parallel building blocks; each layer knows how to load its own slice of a checkpoint."""
