"""Data for the launch scripts: the byte tokenizer, the embedded corpus, Megatron datasets."""
from .corpus import CORPUS, default_prefix
from .tokenizer import ByteTokenizer, parse_special_ids

__all__ = ["ByteTokenizer", "CORPUS", "default_prefix", "parse_special_ids"]
