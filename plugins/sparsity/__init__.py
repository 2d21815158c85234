"""Sparsity techniques."""
