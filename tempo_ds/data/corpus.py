"""The embedded default corpus, turned into Megatron indexed datasets on first use.

genesis_kjv.txt (data/README.md: the Book of Genesis, King James Version, public domain) has one
chapter per block, a heading line and one verse per line. Two indexed datasets are built from it
with megatron-core's IndexedDatasetBuilder and the byte tokenizer:

  <cache>/genesis_kjv_gpt.{bin,idx}   one sequence per chapter, ending with <eod> (GPTDataset)
  <cache>/genesis_kjv_bert.{bin,idx}  one sequence per verse, one document per chapter (the layout
                                      Megatron's BERT preprocessing writes: sentences in documents)

<cache> is $TEMPO_DS_CACHE, else ~/.cache/tempo_ds. Nothing is downloaded.
"""
import os
from pathlib import Path

import numpy
import torch

CORPUS = Path(__file__).resolve().parent / "genesis_kjv.txt"
KINDS = ("gpt", "bert")


def cache_dir():
    return Path(os.environ.get("TEMPO_DS_CACHE", Path.home() / ".cache" / "tempo_ds"))


def chapters(path=CORPUS):
    """[(heading, [verse, ...]), ...] in book order."""
    blocks = [b for b in path.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    out = []
    for block in blocks:
        heading, *verses = block.strip("\n").split("\n")
        out.append((heading, verses))
    return out


def build_indexed(prefix, kind, tokenizer, path=CORPUS):
    """Write `prefix`.bin/.idx for `kind` ("gpt" or "bert") from the text at `path`."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    dtype = numpy.uint16 if tokenizer.vocab_size <= 65536 else numpy.int32
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for heading, verses in chapters(path):
        if kind == "gpt":
            ids = tokenizer.tokenize("\n".join([heading, *verses]) + "\n")
            builder.add_item(torch.from_numpy(numpy.append(ids, tokenizer.eod)))
            builder.end_document()
        else:
            pieces = [tokenizer.tokenize(v) for v in verses]
            builder.add_document(torch.from_numpy(numpy.concatenate(pieces)), [len(p) for p in pieces])
    builder.finalize(f"{prefix}.idx")


def default_prefix(kind, tokenizer):
    """The indexed dataset of the embedded corpus for `kind`, built on first call.

    Safe with several processes on one machine: each writes under a private name and renames, so a
    reader sees either no files or complete ones.
    """
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / f"{CORPUS.stem}_{kind}"
    if not (Path(f"{prefix}.bin").exists() and Path(f"{prefix}.idx").exists()):
        tmp = folder / f".{CORPUS.stem}_{kind}.{os.getpid()}"
        build_indexed(str(tmp), kind, tokenizer)
        # .bin first: the .idx is the marker that both are complete.
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
    return str(prefix)
