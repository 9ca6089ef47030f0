"""Data for the launch scripts: tokenizers, the embedded corpus, checks of a --data-path prefix
(and its sidecar), and `python -m tempo_ds.data.preprocess` for text and JSONL."""
from .check import DataError, check_prefix, index_cache_dir, load_prefix_tokenizer, read_sidecar
from .corpus import CORPUS, default_prefix
from .tokenizer import ByteTokenizer, HFTokenizer, parse_special_ids

__all__ = ["ByteTokenizer", "CORPUS", "DataError", "HFTokenizer", "check_prefix", "default_prefix",
           "index_cache_dir", "load_prefix_tokenizer", "parse_special_ids", "read_sidecar"]
