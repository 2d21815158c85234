"""Factorization techniques."""
