"""python -m tempo_ds.data.preprocess: text/JSONL -> indexed dataset + sidecar, read back with
megatron-core's IndexedDataset, for the byte tokenizer and for tiny BPE and WordPiece tokenizers
trained here with the `tokenizers` library (nothing downloaded)."""
import json
import os
import subprocess
import sys

import numpy
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset

from tempo_ds.data import ByteTokenizer, CORPUS, DataError, HFTokenizer, default_prefix, load_prefix_tokenizer
from tempo_ds.data import preprocess as pp
from tempo_ds.data.datasets import MLMDataset

tokenizers = pytest.importorskip("tokenizers")

LINES = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()][:300]
DOCS = [
    "In the beginning God created the heaven and the earth. And the earth was without form!\n"
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good. Is it? \"Yes.\" And God divided the light.",
    "A single sentence with [MASK] and <|endoftext|> in it",
    "Caf\u00e9 na\u00efve \u2014 unicode text. Second sentence here.",
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """{name: folder} of tiny tokenizers in each on-disk layout HFTokenizer reads."""
    root = tmp_path_factory.mktemp("tokenizers")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(LINES, vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    wordpiece = tokenizers.BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(LINES, vocab_size=300, min_frequency=2, show_progress=False)
    dirs = {name: root / name for name in ("bpe", "bpe_json", "wordpiece", "wordpiece_json")}
    for d in dirs.values():
        d.mkdir()
    bpe.save_model(str(dirs["bpe"]))
    bpe.save(str(dirs["bpe_json"] / "tokenizer.json"))
    wordpiece.save_model(str(dirs["wordpiece"]))
    wordpiece.save(str(dirs["wordpiece_json"] / "tokenizer.json"))
    return dirs


def make_tokenizer(name, dirs):
    return ByteTokenizer() if name == "byte" else HFTokenizer(dirs[name])


def write_text(path, docs):
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return str(path)


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return str(path)


def sequences(prefix):
    data = IndexedDataset(prefix)
    return [numpy.asarray(data[i]).tolist() for i in range(len(data))], data.document_indices.tolist()


def test_gpt_byte_layout_is_the_corpus_layout(tmp_path, monkeypatch):
    # The embedded corpus's GPT dataset is Megatron's --append-eod layout; preprocessing its text
    # by blank-line blocks must give the same bytes.
    monkeypatch.setenv("TEMPO_DS_CACHE", str(tmp_path / "cache"))
    reference = default_prefix("gpt", ByteTokenizer())
    pp.preprocess([str(CORPUS)], tmp_path / "gen", "gpt", progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"gen{suffix}").read_bytes() == open(reference + suffix, "rb").read()


@pytest.mark.parametrize("name", ["byte", "bpe", "bpe_json", "wordpiece", "wordpiece_json"])
@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_gpt_round_trip(tmp_path, tokenizer_dirs, name, fmt):
    tok = make_tokenizer(name, tokenizer_dirs)
    src = write_text(tmp_path / "in.txt", DOCS) if fmt == "text" else write_jsonl(tmp_path / "in.jsonl", DOCS)
    stats = pp.preprocess([src], tmp_path / "out", "gpt", tok, progress=False)
    seqs, doc_index = sequences(str(tmp_path / "out"))
    # A text block keeps its trailing newline; a JSON string is taken as it is.
    texts = [d + "\n" for d in DOCS] if fmt == "text" else DOCS
    assert seqs == [tok.tokenize(t).tolist() + [tok.eod] for t in texts]
    assert doc_index == list(range(len(DOCS) + 1))
    assert stats["documents"] == len(DOCS) and stats["tokens"] == sum(map(len, seqs))
    # The sidecar gives back the same tokenizer, with no --vocab-size/--special-ids.
    back = load_prefix_tokenizer(str(tmp_path / "out"))
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size and back.eod == tok.eod
    assert back.tokenize(DOCS[0]).tolist() == tok.tokenize(DOCS[0]).tolist()


def test_hf_special_tokens_stay_whole(tokenizer_dirs):
    for name, token in (("bpe", "<|endoftext|>"), ("wordpiece", "[MASK]")):
        tok = make_tokenizer(name, tokenizer_dirs)
        assert tok.tokenize(f"a {token} b").tolist().count(tok.vocab[token]) == 1


@pytest.mark.parametrize("name", ["byte", "wordpiece", "wordpiece_json"])
def test_bert_round_trip(tmp_path, tokenizer_dirs, name):
    tok = make_tokenizer(name, tokenizer_dirs)
    pp.preprocess([write_text(tmp_path / "in.txt", DOCS)], tmp_path / "out", "bert", tok, progress=False)
    seqs, doc_index = sequences(str(tmp_path / "out"))
    sentences = [pp.split_sentences(d) for d in DOCS]
    assert seqs == [tok.tokenize(s).tolist() for doc in sentences for s in doc]
    assert doc_index == numpy.cumsum([0] + [len(doc) for doc in sentences]).tolist()
    # MLMDataset takes the sidecar's special ids: [CLS] first, [SEP]s, [PAD] after.
    back = load_prefix_tokenizer(str(tmp_path / "out"))
    item = MLMDataset(str(tmp_path / "out"), back, 64, 4, seed=0)[0]
    text = item["tokens"].tolist()
    n = int(item["attention_mask"].sum())
    assert text[0] == tok.cls and text[n - 1] == tok.sep and set(text[n:]) <= {tok.pad}


def test_split_sentences():
    assert pp.split_sentences('One. "Two?" Three!\nFour (five.) six\n\nSeven') == [
        "One.", '"Two?"', "Three!", "Four (five.)", "six", "Seven"]


def test_bpe_has_no_bert_specials(tokenizer_dirs):
    tok = make_tokenizer("bpe", tokenizer_dirs)
    with pytest.raises(NotImplementedError, match="no mask token.*--special-ids mask=ID"):
        tok.mask


@pytest.mark.parametrize("kind,name", [("gpt", "byte"), ("gpt", "bpe"), ("bert", "wordpiece")])
def test_workers_give_identical_files(tmp_path, tokenizer_dirs, monkeypatch, kind, name):
    # Small chunks, so that two workers really share the documents out of order.
    monkeypatch.setattr(pp, "CHUNK_BYTES", 2000)
    tok = make_tokenizer(name, tokenizer_dirs)
    src = [write_jsonl(tmp_path / "a.jsonl", LINES[:150]), write_text(tmp_path / "b.txt", LINES[150:])]
    one = pp.preprocess(src, tmp_path / "one", kind, tok, workers=1, progress=False)
    two = pp.preprocess(src, tmp_path / "two", kind, tok, workers=2, progress=False)
    assert one["documents"] == two["documents"] == len(LINES)
    for suffix in (".bin", ".idx", ".json"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def test_documents_per_file(tmp_path):
    files = [write_text(tmp_path / f"{i}.txt", DOCS[:2]) for i in range(3)]
    stats = pp.preprocess([str(tmp_path / "*.txt")], tmp_path / "out", "gpt", documents="file", progress=False)
    assert stats["documents"] == len(files)
    assert sequences(str(tmp_path / "out"))[0][0][:-1] == ByteTokenizer().tokenize(open(files[0]).read()).tolist()


def test_errors_name_the_problem(tmp_path, tokenizer_dirs):
    with pytest.raises(DataError, match=r"--input .*nothing\*\.txt: no such file"):
        pp.preprocess([str(tmp_path / "nothing*.txt")], tmp_path / "out", progress=False)
    (tmp_path / "empty.txt").write_text("\n \n\n")
    with pytest.raises(DataError, match="no text in 1 file.*empty or blank"):
        pp.preprocess([str(tmp_path / "empty.txt")], tmp_path / "out", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no key 'text' \(found \['body'\]\).*--json-key"):
        pp.preprocess([str(tmp_path / "bad.jsonl")], tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="without extension"):
        pp.preprocess([str(tmp_path / "bad.jsonl")], tmp_path / "out.bin", progress=False)
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"notok: holds no known tokenizer file; expected tokenizer\.json "
                                         r"or vocab\.json \+ merges\.txt or vocab\.txt, found \['config\.json'\]"):
        HFTokenizer(tmp_path / "notok")
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_failed_run_keeps_the_old_dataset(tmp_path):
    good = write_text(tmp_path / "good.txt", DOCS)
    pp.preprocess([good], tmp_path / "out", progress=False)
    before = {s: (tmp_path / f"out{s}").read_bytes() for s in (".bin", ".idx", ".json")}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x" * 100}) + "\nnot json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not a JSON object"):
        pp.preprocess([good, str(tmp_path / "bad.jsonl")], tmp_path / "out", progress=False)
    assert {s: (tmp_path / f"out{s}").read_bytes() for s in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.txt", "out.bin", "out.idx", "out.json"]


def test_cli_summary_and_errors(tmp_path, tokenizer_dirs, capsys):
    src = write_text(tmp_path / "in.txt", DOCS)
    assert pp.main(["--input", src, "--output-prefix", str(tmp_path / "out"), "--kind", "bert",
                    "--tokenizer-dir", str(tokenizer_dirs["wordpiece"]), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{len(DOCS)} documents" in out and "documents/s" in out and "tokens/s" in out and "MB/s" in out
    assert json.loads((tmp_path / "out.json").read_text())["tokenizer"]["files"] == ["vocab.txt"]
    assert pp.main(["--input", src, "--output-prefix", str(tmp_path / "x"), "--tokenizer-dir", str(tmp_path)]) == 2
    assert "holds no known tokenizer file" in capsys.readouterr().err


@pytest.mark.parametrize("model,kind,name", [("gpt2", "gpt", "bpe"), ("bert", "bert", "wordpiece")])
def test_preprocessed_prefix_trains(tmp_path, tokenizer_dirs, model, kind, name):
    # Needs the trainer to read the sidecar (load_prefix_tokenizer): the tiny vocabularies here
    # (400 BPE, 300 WordPiece ids) differ from the byte tokenizer's 261.
    prefix = tmp_path / "data"
    src = write_jsonl(tmp_path / "in.jsonl", [" ".join(LINES[i: i + 6]) for i in range(0, 300, 6)])
    pp.preprocess([src], prefix, kind, make_tokenizer(name, tokenizer_dirs), progress=False)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29500 + os.getpid() % 1000), "TEMPO_DS_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "tempo_ds.training.train", "--model", model,
                          "--data-path", str(prefix), "--steps", "2", "--seq-length", "32",
                          "--no-summary"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (tmp_path / "index_cache").exists()
