"""Functional API of tempo_ds: each op keeps less for backward than its stock PyTorch twin."""
from .gelu import GeluFunction, gelu

__all__ = ["GeluFunction", "gelu"]
