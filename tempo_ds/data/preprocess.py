"""Text or JSONL -> a Megatron indexed dataset that the launch scripts train on as it is.

    python -m tempo_ds.data.preprocess --input 'books/*.txt' --output-prefix data/books --kind gpt
    bash launch/train_gpt2.sh --data-path data/books

Writes PREFIX.bin/PREFIX.idx with megatron-core's IndexedDatasetBuilder and PREFIX.json, the
sidecar naming the tokenizer, its vocabulary size and special ids (tempo_ds.data.check), so the
trainer needs no --vocab-size/--special-ids.

Inputs: text files (a document per file, or per blank-line-separated block: --documents) and JSONL
(.jsonl/.json/.ndjson: a document per line, its text under --json-key). Layouts (--kind):
  gpt   one sequence per document, ending with the tokenizer's eod (Megatron's --append-eod);
  bert  one sequence per sentence, sentences grouped by document (Megatron's --split-sentences),
        as MLMDataset reads them. Sentences end at . ! or ? (with closing quotes or brackets)
        before whitespace, or at a blank line: a plain rule, not nltk's punkt.
Tokenizers: the byte tokenizer (default) or a Hugging Face tokenizer in a local folder
(--tokenizer-dir: tokenizer.json, GPT-2 vocab.json + merges.txt, or BERT vocab.txt).

--workers N tokenizes chunks of documents in N processes; chunks are written in input order, so
the files are byte-identical to --workers 1. Output goes to hidden temporary names in the output
folder, renamed at the end: a run that dies leaves no dataset under the final name.
"""
import argparse
import collections
import glob
import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

import numpy
import torch

from .check import DataError, write_sidecar
from .corpus import token_dtype
from .tokenizer import ByteTokenizer, HFTokenizer

KINDS = ("gpt", "bert")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
# Documents are sent to workers in chunks of about this many bytes of text.
CHUNK_BYTES = 1 << 20
SENTENCE_END = re.compile(r"([.!?][\"'\u201d\u2019)\]]*)\s+|\n\s*\n")

# Set in each worker (and in the main process for --workers 1) by _init_worker.
_STATE = {}


def expand_inputs(patterns):
    """Files named by `patterns` (paths or globs), in order, each once. Raises DataError naming a
    pattern that matches no file."""
    if not patterns:
        raise DataError("no input files: pass --input FILE [FILE ...] (paths or globs)")
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matched = [m for m in matched if Path(m).is_file()]
        if not matched:
            raise DataError(f"--input {pattern}: no such file")
        files.extend(m for m in matched if m not in files)
    return [Path(f) for f in files]


def _decode(raw, path, where):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{where}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_documents(path, documents, json_key):
    """Yield (text, bytes read) for each document of `path`: a JSONL line's `json_key`, a whole
    text file (documents="file") or a blank-line-separated block of one (documents="blank-line").
    Blank documents are yielded too (the caller skips them) so progress counts their bytes."""
    with open(path, "rb") as f:
        if path.name.endswith(JSONL_SUFFIXES):
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    yield "", len(raw)
                    continue
                try:
                    record = json.loads(raw)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: not a JSON object ({e})") from e
                if not isinstance(record, dict) or json_key not in record:
                    keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{path}:{lineno}: no key {json_key!r} (found {keys}); "
                                    "choose the text's key with --json-key")
                if not isinstance(record[json_key], str):
                    raise DataError(f"{path}:{lineno}: {json_key!r} is a {type(record[json_key]).__name__}, "
                                    "not a string")
                yield record[json_key], len(raw)
        elif documents == "file":
            raw = f.read()
            yield _decode(raw, path, 1), len(raw)
        else:
            block, start = [], 1
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    block.append(raw)
                    continue
                if block:
                    yield _decode(b"".join(block), path, start), sum(map(len, block))
                yield "", len(raw)
                block, start = [], lineno + 1
            if block:
                yield _decode(b"".join(block), path, start), sum(map(len, block))


def split_sentences(text):
    """The sentences of `text`, stripped, without empty ones (see the module docstring)."""
    parts = SENTENCE_END.split(text)
    # re.split interleaves each match's captured ending (None at a blank line) with the pieces.
    endings = parts[1::2] + [None]
    sentences = (piece + (end or "") for piece, end in zip(parts[::2], endings))
    return [s.strip() for s in sentences if s.strip()]


def _init_worker(tokenizer, kind):
    _STATE.update(tokenizer=tokenizer, kind=kind)


def _tokenize_all(texts):
    tok = _STATE["tokenizer"]
    if hasattr(tok, "tokenize_batch"):
        return tok.tokenize_batch(texts)
    return [tok.tokenize(t) for t in texts]


def encode_chunk(texts):
    """[(ids, sequence lengths), ...] for each non-blank document in `texts`, in order: GPT
    documents get eod appended; BERT documents are their sentences, empty ones dropped."""
    tok, kind = _STATE["tokenizer"], _STATE["kind"]
    if kind == "gpt":
        out = []
        for ids in _tokenize_all(texts):
            ids = numpy.append(ids, numpy.int32(tok.eod)).astype(numpy.int32)
            out.append((ids, [len(ids)]))
        return out
    per_doc = [split_sentences(t) for t in texts]
    flat = _tokenize_all([s for doc in per_doc for s in doc])
    out, at = [], 0
    for doc in per_doc:
        pieces = [p for p in flat[at: at + len(doc)] if len(p)]
        at += len(doc)
        if pieces:
            out.append((numpy.concatenate(pieces).astype(numpy.int32), [len(p) for p in pieces]))
    return out


def _chunks(files, documents, json_key):
    """(texts, bytes) chunks of about CHUNK_BYTES over all files' non-blank documents."""
    texts, size = [], 0
    for path in files:
        for text, nbytes in read_documents(path, documents, json_key):
            size += nbytes
            if text.strip():
                texts.append(text)
            if size >= CHUNK_BYTES:
                yield texts, size
                texts, size = [], 0
    if texts or size:
        yield texts, size


def _encoded(chunks, tokenizer, kind, workers):
    """(encoded documents, bytes) per chunk, in input order; at most 2 x workers chunks in flight
    so memory stays bounded whatever the input size."""
    if workers == 1:
        _init_worker(tokenizer, kind)
        for texts, size in chunks:
            yield encode_chunk(texts), size
        return
    with multiprocessing.Pool(workers, _init_worker, (tokenizer, kind)) as pool:
        pending = collections.deque()
        for texts, size in chunks:
            pending.append((pool.apply_async(encode_chunk, (texts,)), size))
            if len(pending) >= 2 * workers:
                result, nbytes = pending.popleft()
                yield result.get(), nbytes
        while pending:
            result, nbytes = pending.popleft()
            yield result.get(), nbytes


def preprocess(inputs, output_prefix, kind="gpt", tokenizer=None, documents="blank-line",
               json_key="text", workers=1, progress=None):
    """Tokenize `inputs` (paths or globs) into `output_prefix`.bin/.idx/.json; return the stats
    (documents, sequences, tokens, input_bytes, output_bytes, seconds, max_id).

    tokenizer: a ByteTokenizer (default) or HFTokenizer. progress: None shows a bar on a terminal
    only, True/False force it. Raises DataError for missing, empty or malformed input.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if documents not in ("file", "blank-line"):
        raise ValueError(f"documents must be 'file' or 'blank-line', got {documents!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    output_prefix = str(output_prefix)
    if output_prefix.endswith((".bin", ".idx", ".json")):
        raise DataError(f"--output-prefix {output_prefix}: give the prefix without extension")
    tokenizer = tokenizer or ByteTokenizer()
    files = expand_inputs(inputs)
    total = sum(f.stat().st_size for f in files)
    folder = Path(output_prefix).resolve().parent
    if not folder.is_dir():
        raise DataError(f"--output-prefix {output_prefix}: folder {folder} does not exist")
    tmp = str(folder / f".{Path(output_prefix).name}.tmp{os.getpid()}")
    dtype = token_dtype(tokenizer)
    stats = dict(documents=0, sequences=0, tokens=0, input_bytes=0, max_id=-1)
    start = time.perf_counter()
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, mininterval=1.0,
               disable=None if progress is None else not progress, desc="preprocess", file=sys.stderr)
    try:
        builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
        for encoded, nbytes in _encoded(_chunks(files, documents, json_key), tokenizer, kind, workers):
            for ids, lengths in encoded:
                if kind == "gpt":
                    builder.add_item(torch.from_numpy(ids))
                    builder.end_document()
                else:
                    builder.add_document(torch.from_numpy(ids), lengths)
                stats["documents"] += 1
                stats["sequences"] += len(lengths)
                stats["tokens"] += len(ids)
                stats["max_id"] = max(stats["max_id"], int(ids.max()) if len(ids) else -1)
            stats["input_bytes"] += nbytes
            bar.update(nbytes)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{stats['documents'] / elapsed:,.0f} docs/s, "
                                f"{stats['tokens'] / elapsed:,.0f} tokens/s", refresh=False)
        builder.finalize(f"{tmp}.idx")
        bar.close()
        if stats["documents"] == 0:
            raise DataError(f"--input {' '.join(map(str, inputs))}: no text in {len(files)} file(s) "
                            f"({total} bytes): every document is empty or blank")
        if stats["max_id"] >= tokenizer.vocab_size:
            raise DataError(f"tokenizer gave id {stats['max_id']}, outside its vocab_size "
                            f"{tokenizer.vocab_size}")
        stats["seconds"] = time.perf_counter() - start
        stats["output_bytes"] = os.path.getsize(f"{tmp}.bin") + os.path.getsize(f"{tmp}.idx")
        write_sidecar(f"{tmp}.json", kind, tokenizer, dtype=numpy.dtype(dtype).name,
                      **{k: stats[k] for k in ("documents", "sequences", "tokens", "max_id")})
        # The sidecar first and the .idx last: a reader that sees the .idx sees a complete dataset.
        for suffix in (".json", ".bin", ".idx"):
            os.replace(tmp + suffix, output_prefix + suffix)
    finally:
        bar.close()
        for suffix in (".json", ".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
    return stats


def summary(stats, output_prefix):
    """One line: what was written and how fast."""
    s = max(stats["seconds"], 1e-9)
    return (f"preprocess: {stats['documents']:,} documents, {stats['sequences']:,} sequences, "
            f"{stats['tokens']:,} tokens from {stats['input_bytes'] / 1e6:,.1f} MB in {s:.1f} s "
            f"({stats['documents'] / s:,.0f} documents/s, {stats['tokens'] / s:,.0f} tokens/s, "
            f"{stats['input_bytes'] / 1e6 / s:,.1f} MB/s) -> {output_prefix}.bin/.idx/.json "
            f"({stats['output_bytes'] / 1e6:,.1f} MB)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tempo_ds.data.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files or globs")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--kind", choices=KINDS, default="gpt", help="gpt: documents + eod; bert: sentences")
    p.add_argument("--documents", choices=("blank-line", "file"), default="blank-line",
                   help="text files: a document per blank-line-separated block, or per file")
    p.add_argument("--json-key", default="text", help="JSONL: the key holding each document's text")
    p.add_argument("--tokenizer-dir", default=None,
                   help="local Hugging Face tokenizer folder; default: the byte tokenizer")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # --workers is the one parallelism knob: the Rust library's own threads would compete with it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.tokenizer_dir is None:
            tokenizer = ByteTokenizer()
        else:
            try:
                tokenizer = HFTokenizer(args.tokenizer_dir)
            except (OSError, ValueError) as e:
                raise DataError(str(e)) from e
        stats = preprocess(args.input, args.output_prefix, args.kind, tokenizer, args.documents,
                           args.json_key, args.workers)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(stats, args.output_prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
