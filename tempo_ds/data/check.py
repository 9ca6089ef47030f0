"""What a --data-path prefix holds, checked before any rank builds a dataset from it.

An indexed dataset is PREFIX.bin (the tokens) and PREFIX.idx (megatron-core's index), plus, when
`python -m tempo_ds.data.preprocess` wrote it, PREFIX.json: the sidecar naming the tokenizer, its
vocabulary size and special ids, and the layout ("gpt": one sequence per document ending with eod;
"bert": sentences grouped into documents). load_prefix_tokenizer() reads it, so the trainer needs
no --vocab-size/--special-ids for such data. check_prefix() turns what would otherwise surface as
an AssertionError or a numpy buffer error on every rank into one DataError naming the file.
"""
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy

from .corpus import cache_dir
from .tokenizer import ByteTokenizer, HFTokenizer

SIDECAR_FORMAT = "tempo_ds-indexed-dataset/1"
# megatron.core.datasets.indexed_dataset: _INDEX_HEADER, then version (<Q), dtype code (<B),
# sequence count (<Q), document-index count (<Q); then int32 lengths, int64 pointers, int64 indices.
INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# megatron's DType codes.
DTYPES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64,
          6: numpy.float64, 7: numpy.float32, 8: numpy.uint16}
RAW_SUFFIXES = (".txt", ".jsonl", ".json", ".ndjson", ".text", ".md")
PREPROCESS_HINT = "python -m tempo_ds.data.preprocess --input FILE --output-prefix PREFIX"


class DataError(ValueError):
    """A --data-path that cannot be trained on; the message names the file and the problem."""


def sidecar_path(prefix):
    return f"{prefix}.json"


def write_sidecar(path, kind, tokenizer, **stats):
    """Write the sidecar describing an indexed dataset to `path` (normally PREFIX.json)."""
    if isinstance(tokenizer, HFTokenizer):
        spec = {"type": "hf", "dir": tokenizer.folder, "files": list(tokenizer.layout)}
        specials = tokenizer.special_ids
    else:
        spec = {"type": "byte"}
        specials = {n: getattr(tokenizer, n) for n in ("eod", "pad", "cls", "sep", "mask")}
    meta = {"format": SIDECAR_FORMAT, "kind": kind, "tokenizer": spec,
            "vocab_size": int(tokenizer.vocab_size), "special_ids": specials, **stats}
    Path(path).write_text(json.dumps(meta, indent=2) + "\n")


def read_sidecar(prefix):
    """The sidecar of `prefix` as a dict, or None when there is none."""
    path = Path(sidecar_path(prefix))
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); rerun {PREPROCESS_HINT}") from e
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise DataError(f"{path}: not a tempo_ds dataset sidecar (no \"format\": \"{SIDECAR_FORMAT}\")")
    return meta


def load_prefix_tokenizer(prefix, vocab_size=None, special_ids=None):
    """The tokenizer of the indexed dataset at `prefix` (None: the embedded corpus).

    With a sidecar (PREFIX.json) it is the tokenizer that wrote the data, with its vocabulary size
    and special ids; without one it is the byte tokenizer. `vocab_size` and `special_ids` (the
    trainer's --vocab-size and parsed --special-ids) override either.
    """
    special_ids = dict(special_ids or {})
    meta = read_sidecar(prefix) if prefix is not None else None
    if meta is None:
        return ByteTokenizer(vocab_size, **special_ids)
    size = vocab_size if vocab_size is not None else meta["vocab_size"]
    ids = {**meta.get("special_ids", {}), **special_ids}
    spec = meta["tokenizer"]
    if spec.get("type") == "byte":
        return ByteTokenizer(size, **ids)
    folder = spec.get("dir", "")
    if not Path(folder).is_dir():
        raise DataError(f"{sidecar_path(prefix)}: its tokenizer folder {folder!r} is missing; put it "
                        f"back or edit \"dir\" in {sidecar_path(prefix)}")
    return HFTokenizer(folder, size, **ids)


def index_cache_dir(prefix):
    """Folder for megatron's shuffled-index cache of `prefix`: under $TEMPO_DS_CACHE (default
    ~/.cache/tempo_ds)/index_cache, keyed by the prefix's absolute path, never beside the data
    (which may be read-only or shared). Not created here: megatron's builder creates it on rank 0."""
    path = os.path.abspath(prefix)
    key = hashlib.sha256(path.encode()).hexdigest()[:12]
    return str(cache_dir() / "index_cache" / f"{os.path.basename(path)}_{key}")


def _check_paths(prefix):
    if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file():
        return
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix) and Path(prefix[: -len(suffix)] + ".idx").is_file():
            raise DataError(f"--data-path {prefix}: pass the prefix without extension: "
                            f"{prefix[: -len(suffix)]}")
    if Path(prefix).is_dir():
        raise DataError(f"--data-path {prefix}: is a folder; pass the prefix of PREFIX.bin/PREFIX.idx")
    if prefix.endswith(RAW_SUFFIXES) or Path(prefix).is_file():
        raise DataError(f"--data-path {prefix}: looks like raw text, not an indexed dataset prefix; run "
                        f"{PREPROCESS_HINT} first and pass PREFIX")
    for suffix in (".idx", ".bin"):
        if not Path(prefix + suffix).is_file():
            raise DataError(f"{prefix}{suffix}: no such file (an indexed dataset is PREFIX.bin + "
                            f"PREFIX.idx; to make one from text run {PREPROCESS_HINT})")


def read_index(idx_path):
    """(dtype, lengths, pointers, document_indices) of a megatron .idx, each checked against the
    header and the file size. Raises DataError naming `idx_path`."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        raise DataError(f"{idx_path}: {size} bytes, shorter than the {HEADER_BYTES}-byte index header "
                        "(truncated or empty)")
    if head[:9] != INDEX_MAGIC:
        raise DataError(f"{idx_path}: not a megatron index (starts with {head[:9]!r}, expected {INDEX_MAGIC!r})")
    version, code, count, docs = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise DataError(f"{idx_path}: index version {version}, only version 1 is known")
    if code not in DTYPES:
        raise DataError(f"{idx_path}: unknown token dtype code {code} (known: {sorted(DTYPES)})")
    need = HEADER_BYTES + 12 * count + 8 * docs
    # A multimodal index adds one int8 mode per sequence.
    if size not in (need, need + count):
        raise DataError(f"{idx_path}: the header counts {count} sequences and {docs} document "
                        f"indices, which take {need} bytes, but the file has {size} (truncated or "
                        "overwritten; rerun the preprocessing)")
    if count == 0:
        raise DataError(f"{idx_path}: the dataset holds no sequences")
    index = numpy.memmap(idx_path, mode="r", offset=HEADER_BYTES)
    lengths = index[: 4 * count].view(numpy.int32)
    pointers = index[4 * count: 12 * count].view(numpy.int64)
    doc_index = index[12 * count: 12 * count + 8 * docs].view(numpy.int64)
    return numpy.dtype(DTYPES[code]), lengths, pointers, doc_index


def check_prefix(prefix, vocab_size, kind=None, chunk_tokens=1 << 24):
    """Check the indexed dataset at `prefix` before datasets are built from it; raise DataError.

    Checks: PREFIX.bin and PREFIX.idx exist (a path with .bin/.idx/.txt/.jsonl gets a hint); the
    index header (magic, version, dtype code) and its counts agree with the .idx size, its
    pointers with its lengths and its document indices with its sequence count; the .bin size is
    the index's total; every token id lies in [0, vocab_size) (read `chunk_tokens` at a time);
    and, when `kind` ("gpt"/"bert") is given and a sidecar exists, the data was made for it.
    Returns {"sequences", "documents", "tokens", "dtype"}.
    """
    prefix = str(prefix)
    _check_paths(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    dtype, lengths, pointers, doc_index = read_index(idx_path)
    count = len(lengths)
    if lengths.min() < 0:
        raise DataError(f"{idx_path}: sequence {int(numpy.argmin(lengths))} has a negative length")
    ends = numpy.cumsum(lengths, dtype=numpy.int64) * dtype.itemsize
    if pointers[0] != 0 or not numpy.array_equal(pointers[1:], ends[:-1]):
        bad = int(numpy.flatnonzero(pointers != numpy.concatenate([[0], ends[:-1]]))[0])
        raise DataError(f"{idx_path}: the byte offset of sequence {bad} does not follow from the "
                        "lengths before it (corrupt index)")
    if len(doc_index) < 2 or doc_index[0] != 0 or doc_index[-1] != count or numpy.any(numpy.diff(doc_index) < 0):
        raise DataError(f"{idx_path}: the document indices do not run from 0 up to the {count} "
                        "sequences (corrupt index)")
    tokens = int(ends[-1]) // dtype.itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != int(ends[-1]):
        raise DataError(f"{bin_path}: {bin_size} bytes, but {idx_path} indexes {tokens} tokens of "
                        f"{dtype.name} = {int(ends[-1])} bytes (truncated, or the .bin and .idx of "
                        "different runs)")
    # numpy cannot map an empty file; a dataset of empty sequences has no id to check.
    data = numpy.memmap(bin_path, dtype=dtype, mode="r") if tokens else ()
    for start in range(0, tokens, chunk_tokens):
        chunk = data[start: start + chunk_tokens]
        low, high = chunk.min(), chunk.max()
        if low < 0 or high >= vocab_size:
            bad = start + int(numpy.flatnonzero((chunk < 0) | (chunk >= vocab_size))[0])
            raise DataError(
                f"{bin_path}: token {bad} is id {data[bad]}, outside the vocabulary [0, {vocab_size}): "
                f"the data was tokenized with another vocabulary; give its size and special ids "
                f"(--vocab-size, --special-ids) or preprocess it with {PREPROCESS_HINT}")
    meta = read_sidecar(prefix)
    if kind is not None and meta is not None and meta.get("kind") != kind:
        raise DataError(f"{sidecar_path(prefix)}: the data was preprocessed for {meta.get('kind')!r}, "
                        f"the model needs {kind!r}; rerun the preprocessing with --kind {kind}")
    return {"sequences": count, "documents": len(doc_index) - 1, "tokens": tokens, "dtype": dtype.name}
