"""tempo_ds.data.check: each bad --data-path gives one DataError naming the file and the problem
(where megatron-core alone gives an AssertionError per rank or numpy's "buffer is smaller than
requested size"); index caches live under $TEMPO_DS_CACHE, not beside the data."""
import json
import os

import numpy
import pytest
import torch

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from tempo_ds.data import ByteTokenizer, DataError, check_prefix, index_cache_dir, load_prefix_tokenizer
from tempo_ds.data.preprocess import preprocess

DOCS = ["First document. It has two sentences.", "Second one! Also two.", "Third, and last. Done."]


@pytest.fixture
def prefix(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(DOCS) + "\n")
    preprocess([str(src)], tmp_path / "data", "gpt", progress=False)
    return str(tmp_path / "data")


def write_ids(prefix, docs, dtype=numpy.uint16):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for ids in docs:
        builder.add_item(torch.tensor(ids))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_good_prefix_passes(prefix):
    # Each block keeps its newline, then eod.
    tokens = sum(len(d.encode()) + 2 for d in DOCS)
    assert check_prefix(prefix, 261, "gpt") == {"sequences": 3, "documents": 3, "tokens": tokens, "dtype": "uint16"}


def test_missing_files(prefix):
    with pytest.raises(DataError, match=r"nope\.idx: no such file.*tempo_ds\.data\.preprocess"):
        check_prefix(prefix + "nope", 261)
    os.remove(prefix + ".bin")
    with pytest.raises(DataError, match=r"data\.bin: no such file"):
        check_prefix(prefix, 261)


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_prefix_with_extension(prefix, suffix):
    with pytest.raises(DataError, match=rf"data\{suffix}: pass the prefix without extension: .*data$"):
        check_prefix(prefix + suffix, 261)


@pytest.mark.parametrize("name", ["mytext.txt", "mytext.jsonl", "notes"])
def test_text_file_as_prefix(tmp_path, name):
    (tmp_path / name).write_text("plain text\n")
    with pytest.raises(DataError, match=rf"{name}: looks like raw text.*python -m tempo_ds\.data\.preprocess"):
        check_prefix(str(tmp_path / name), 261)


def test_truncated_idx(prefix):
    data = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(data[:-8])
    with pytest.raises(DataError, match=rf"data\.idx: the header counts 3 sequences and 4 document indices, "
                                        rf"which take {len(data)} bytes, but the file has {len(data) - 8}"):
        check_prefix(prefix, 261)
    open(prefix + ".idx", "wb").write(data[:20])
    with pytest.raises(DataError, match=r"data\.idx: 20 bytes, shorter than the 34-byte index header"):
        check_prefix(prefix, 261)


def test_bad_magic_and_dtype(prefix):
    data = bytearray(open(prefix + ".idx", "rb").read())
    open(prefix + ".idx", "wb").write(b"NOTANIDX!" + data[9:])
    with pytest.raises(DataError, match=r"data\.idx: not a megatron index"):
        check_prefix(prefix, 261)
    data[17] = 99
    open(prefix + ".idx", "wb").write(data)
    with pytest.raises(DataError, match=r"data\.idx: unknown token dtype code 99"):
        check_prefix(prefix, 261)


def test_truncated_bin(prefix):
    data = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(data[:-2])
    with pytest.raises(DataError, match=rf"data\.bin: {len(data) - 2} bytes, but .*data\.idx indexes "
                                        rf"{len(data) // 2} tokens of uint16 = {len(data)} bytes"):
        check_prefix(prefix, 261)


@pytest.mark.parametrize("chunk", [4, 1 << 24])
def test_ids_outside_vocabulary(tmp_path, chunk):
    # The bad id sits in the last chunk when chunk=4, so every chunk must be read.
    path = write_ids(tmp_path / "ids", [[1, 2, 3], [4, 5, 6, 7, 8], [9, 300, 10]])
    with pytest.raises(DataError, match=r"ids\.bin: token 9 is id 300, outside the vocabulary \[0, 261\)"):
        check_prefix(path, 261, chunk_tokens=chunk)
    assert check_prefix(path, 301, chunk_tokens=chunk)["tokens"] == 11


def test_negative_ids(tmp_path):
    path = write_ids(tmp_path / "neg", [[1, -5, 3]], dtype=numpy.int32)
    with pytest.raises(DataError, match=r"neg\.bin: token 1 is id -5"):
        check_prefix(path, 261)


def test_kind_mismatch(prefix):
    with pytest.raises(DataError, match=r"data\.json: the data was preprocessed for 'gpt', the model needs 'bert'"):
        check_prefix(prefix, 261, "bert")


def test_index_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TEMPO_DS_CACHE", str(tmp_path / "cache"))
    first, second = index_cache_dir(str(tmp_path / "a" / "data")), index_cache_dir(str(tmp_path / "b" / "data"))
    assert first != second
    assert all(p.startswith(str(tmp_path / "cache")) for p in (first, second))
    # Keyed by the absolute path: a relative spelling of the same prefix shares the cache.
    monkeypatch.chdir(tmp_path)
    assert index_cache_dir(os.path.join("a", "data")) == first


def test_load_prefix_tokenizer(prefix, tmp_path):
    # No sidecar: the byte tokenizer, with --vocab-size/--special-ids honoured.
    tok = load_prefix_tokenizer(str(tmp_path / "elsewhere"), 50257, {"eod": 50256})
    assert isinstance(tok, ByteTokenizer) and (tok.vocab_size, tok.eod) == (50257, 50256)
    assert load_prefix_tokenizer(None).vocab_size == 261
    # A sidecar's ids, overridden by explicit ones.
    assert load_prefix_tokenizer(prefix, None, {"pad": 0}).pad == 0
    meta = json.loads(open(prefix + ".json").read())
    meta["tokenizer"] = {"type": "hf", "dir": str(tmp_path / "gone")}
    open(prefix + ".json", "w").write(json.dumps(meta))
    with pytest.raises(DataError, match=r"data\.json: its tokenizer folder .*gone' is missing"):
        load_prefix_tokenizer(prefix)
