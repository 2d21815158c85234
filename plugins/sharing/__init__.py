"""Sharing techniques."""
