"""The embedded default corpus, turned into Megatron indexed datasets on first use.

genesis_kjv.txt (data/README.md: the Book of Genesis, King James Version, public domain) has one
chapter per block, a heading line and one verse per line. Two indexed datasets are built from it
with megatron-core's IndexedDatasetBuilder and the byte tokenizer:

  <cache>/genesis_kjv_gpt_<dtype>_eod<id>_<hash>.{bin,idx}
        one sequence per chapter, ending with <eod> (GPTDataset)
  <cache>/genesis_kjv_bert_<dtype>_<hash>.{bin,idx}
        one sequence per verse, one document per chapter (the layout Megatron's BERT
        preprocessing writes: sentences in documents)

<hash> covers the corpus text, the tokenizer class and the name's other fields, so a tokenizer with
another eod or token dtype, or an edited corpus, gets its own files instead of stale ones.
<cache> is $TEMPO_DS_CACHE, else ~/.cache/tempo_ds. Nothing is downloaded.
"""
import hashlib
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


def token_dtype(tokenizer):
    """The dtype of the .bin tokens: uint16 while every id fits, else int32."""
    return numpy.uint16 if tokenizer.vocab_size <= 65536 else numpy.int32


def cache_name(kind, tokenizer, path=CORPUS):
    """File name (no folder, no suffix) of `kind`'s indexed dataset of the text at `path`.

    It names everything the tokens depend on: the token dtype, the eod id (GPT only: BERT files
    hold no special id), and a hash of those, the tokenizer class and the corpus bytes.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    fields = [kind, numpy.dtype(token_dtype(tokenizer)).name]
    if kind == "gpt":
        fields.append(f"eod{int(tokenizer.eod)}")
    digest = hashlib.sha256("|".join([type(tokenizer).__qualname__, *fields]).encode())
    digest.update(Path(path).read_bytes())
    return "_".join([Path(path).stem, *fields, digest.hexdigest()[:10]])


def build_indexed(prefix, kind, tokenizer, path=CORPUS):
    """Write `prefix`.bin/.idx for `kind` ("gpt" or "bert") from the text at `path`."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    dtype = token_dtype(tokenizer)
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
    name = cache_name(kind, tokenizer)
    prefix = folder / name
    if not (Path(f"{prefix}.bin").exists() and Path(f"{prefix}.idx").exists()):
        tmp = folder / f".{name}.{os.getpid()}"
        build_indexed(str(tmp), kind, tokenizer)
        # .bin first: the .idx is the marker that both are complete.
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
    return str(prefix)
