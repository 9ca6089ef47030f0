"""tempo_ds.data: the corpus cache names what its tokens depend on, and MLMDataset masks and pairs
sentences correctly for data tokenized elsewhere (WordPiece-like ids), not only for bytes."""
import numpy
import pytest
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from tempo_ds.data import ByteTokenizer, default_prefix
from tempo_ds.data.datasets import MLMDataset

# bert-base-uncased's layout: [PAD]=0, [CLS]=101, [SEP]=102, [MASK]=103, words from 999 up.
WORDPIECE = dict(vocab_size=30522, pad=0, cls=101, sep=102, mask=103)


def write_docs(prefix, docs):
    """Indexed dataset in Megatron's BERT layout: `docs` is a list of documents, each a list of
    sentences (lists of token ids)."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for sentences in docs:
        builder.add_document(torch.tensor(numpy.concatenate(sentences), dtype=torch.int64),
                             [len(s) for s in sentences])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def wordpiece_docs(n_docs, n_sentences=6, seed=0):
    """Document d's tokens all lie in [1000 + 1000 d, 2000 + 1000 d), so a token names its document."""
    rng = numpy.random.default_rng(seed)
    return [[rng.integers(1000 + 1000 * d, 2000 + 1000 * d, int(rng.integers(5, 12)))
             for _ in range(n_sentences)] for d in range(n_docs)]


def test_corpus_cache_depends_on_eod(tmp_path, monkeypatch):
    monkeypatch.setenv("TEMPO_DS_CACHE", str(tmp_path))
    byte, bpe = ByteTokenizer(), ByteTokenizer(50257, eod=50256)
    first, second = default_prefix("gpt", byte), default_prefix("gpt", bpe)
    assert first != second
    for prefix, tok in ((first, byte), (second, bpe)):
        data = IndexedDataset(prefix)
        ends = {int(data[i][-1]) for i in range(len(data))}
        assert ends == {tok.eod}, (prefix, ends)
    # Asking again reuses the file instead of building another.
    assert default_prefix("gpt", bpe) == second


def test_wordpiece_masking_targets_words(tmp_path):
    tok = ByteTokenizer(**WORDPIECE)
    specials = {tok.eod, tok.pad, tok.cls, tok.sep, tok.mask}
    ds = MLMDataset(write_docs(tmp_path / "wp", wordpiece_docs(8)), tok, 64, 400, seed=1)
    targets = candidates = replaced = 0
    for i in range(len(ds)):
        item = ds[i]
        text, labels, loss = item["tokens"], item["labels"], item["loss_mask"].bool()
        target_ids = set(labels[loss].tolist())
        assert not target_ids & specials, target_ids & specials
        targets += int(loss.sum())
        candidates += int(item["attention_mask"].sum()) - 3  # less [CLS] and the two [SEP]s
        swapped = text[loss & (text != labels) & (text != tok.mask)].tolist()
        assert all(0 <= t < tok.vocab_size and t not in specials for t in swapped), swapped
        replaced += len(swapped)
    assert abs(targets / candidates - 0.15) < 0.02, targets / candidates
    # About 10% of the targets are random replacements; each is checked above.
    assert 0.05 < replaced / targets < 0.15, replaced / targets


def test_random_next_sentence_comes_from_another_document(tmp_path):
    tok = ByteTokenizer(**WORDPIECE)
    # Three documents: a uniform draw over all of them would pick A's own a third of the time.
    ds = MLMDataset(write_docs(tmp_path / "wp", wordpiece_docs(3)), tok, 64, 300, seed=2)
    n_random = 0
    for i in range(len(ds)):
        item = ds[i]
        if not item["is_random"]:
            continue
        n_random += 1
        loss = item["loss_mask"].bool()
        original = torch.where(loss, item["labels"], item["tokens"])
        words = (original >= 1000) & item["attention_mask"].bool()
        doc_a = set(((original[words & (item["tokentype_ids"] == 0)] - 1000) // 1000).tolist())
        doc_b = set(((original[words & (item["tokentype_ids"] == 1)] - 1000) // 1000).tolist())
        assert len(doc_a) == 1 and len(doc_b) == 1 and doc_a != doc_b, (i, doc_a, doc_b)
    assert n_random > 100


def test_nsp_needs_two_documents(tmp_path):
    tok = ByteTokenizer(**WORDPIECE)
    prefix = write_docs(tmp_path / "one", wordpiece_docs(1))
    with pytest.raises(ValueError, match="nsp"):
        MLMDataset(prefix, tok, 64, 10, seed=0)
    item = MLMDataset(prefix, tok, 64, 10, seed=0, nsp=False)[0]
    assert not item["is_random"]
