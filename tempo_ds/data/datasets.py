"""Training datasets over Megatron indexed data (.bin/.idx).

GPT: megatron-core's GPTDataset, built by BlendedMegatronDatasetBuilder (shuffled sample index
cached next to the data). BERT: MLMDataset below, read straight from megatron-core's
IndexedDataset: Megatron's own BERT dataset needs a WordPiece vocabulary ("##" pieces) to pick
whole words, which a byte tokenizer does not have.
"""
import numpy
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset


def gpt_dataset(prefix, tokenizer, seq_length, num_samples, seed, cache_path=None):
    """Megatron GPTDataset over `prefix` with at least `num_samples` samples of `seq_length`.

    Call on every rank after torch.distributed is initialized: rank 0 builds the index cache,
    the others wait and read it. Items are dicts of tokens, labels, loss_mask, position_ids and
    attention_mask ([1, s, s], True = masked).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([prefix], None), split="100,0,0",
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=True, path_to_cache=cache_path,
        mid_level_dataset_surplus=0.005)
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, None, None], lambda: True, config).build()
    return train


class MLMDataset(torch.utils.data.Dataset):
    """BERT samples (masked LM, optional next-sentence prediction) from an indexed dataset whose
    sequences are sentences grouped into documents (Megatron's BERT preprocessing layout).

    Sample i depends only on (seed, i), so any rank, and a resumed run, sees the same sample i.
    Layout: [CLS] A [SEP] B [SEP] [PAD]...; with NSP, B is the next sentences of A's document half
    the time and sentences of another document otherwise (label 1 = random), so NSP needs two
    documents. Masking follows BERT: `mask_prob` of the tokens that are not one of the tokenizer's
    special ids (eod, pad, cls, sep, mask) are targets, of which 80% become [MASK], 10% a token drawn
    uniformly from [0, vocab_size) less the special ids, and 10% stay. With the default byte
    tokenizer the non-special tokens are exactly the bytes 0..255, as before.

    Items are dicts of tokens, tokentype_ids, attention_mask (1 = keep), labels, loss_mask and
    is_random (the next-sentence label): tempo_ds.workload's batch format.
    """

    def __init__(self, prefix, tokenizer, seq_length, num_samples, seed, nsp=True, mask_prob=0.15):
        self.data = IndexedDataset(prefix)
        self.tok = tokenizer
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.seed = seed
        self.nsp = nsp
        self.mask_prob = mask_prob
        # Documents with at least two sentences can give an A and a B.
        doc = self.data.document_indices
        self.docs = [(int(doc[i]), int(doc[i + 1])) for i in range(len(doc) - 1) if doc[i + 1] - doc[i] >= 2]
        if not self.docs:
            raise ValueError(f"{prefix}: no document has two sentences")
        if nsp and len(self.docs) < 2:
            # A "random" B must come from another document, else the label can be wrong.
            raise ValueError(f"nsp=True needs at least two documents with two sentences; {prefix} has "
                             f"{len(self.docs)} (pass nsp=False / --no-nsp)")
        # Special ids are never targets nor random replacements: with data tokenized elsewhere
        # (e.g. WordPiece) a position test like `id < 256` would miss the words entirely.
        specials = {tokenizer.eod, tokenizer.pad, tokenizer.cls, tokenizer.sep, tokenizer.mask}
        self.specials = numpy.array(sorted(specials), dtype=numpy.int64)
        self.replacements = numpy.setdiff1d(numpy.arange(tokenizer.vocab_size, dtype=numpy.int64), self.specials)
        if not len(self.replacements):
            raise ValueError(f"tokenizer: vocab_size {tokenizer.vocab_size} leaves no non-special id")

    def __len__(self):
        return self.num_samples

    def _take(self, rng, start, end, budget):
        """Sentences start, start+1, ... of one document while they fit in `budget` tokens."""
        out = []
        for s in range(start, end):
            piece = numpy.asarray(self.data[s], dtype=numpy.int64)
            if out and sum(map(len, out)) + len(piece) > budget:
                break
            out.append(piece[: budget - sum(map(len, out))])
        return numpy.concatenate(out) if out else numpy.zeros(0, numpy.int64)

    def __getitem__(self, idx):
        rng = numpy.random.default_rng([self.seed, idx])
        budget = self.seq_length - 3
        doc = int(rng.integers(len(self.docs)))
        first, last = self.docs[doc]
        split = int(rng.integers(first + 1, last))
        is_random = bool(self.nsp and rng.random() < 0.5)
        a = self._take(rng, int(rng.integers(first, split)), split, budget // 2)
        if is_random:
            # Uniform over the other documents: a draw from all of them can pick A's own document,
            # sometimes its true continuation, under the label "random".
            other = int(rng.integers(len(self.docs) - 1))
            other_first, other_last = self.docs[other + (other >= doc)]
            b = self._take(rng, int(rng.integers(other_first, other_last)), other_last, budget - len(a))
        else:
            b = self._take(rng, split, last, budget - len(a))
        tokens = numpy.concatenate([[self.tok.cls], a, [self.tok.sep], b, [self.tok.sep]])
        types = numpy.concatenate([numpy.zeros(len(a) + 2), numpy.ones(len(b) + 1)]).astype(numpy.int64)
        n = len(tokens)

        labels = numpy.full(self.seq_length, -1, numpy.int64)
        candidates = numpy.flatnonzero(~numpy.isin(tokens, self.specials))
        picked = candidates[rng.random(len(candidates)) < self.mask_prob] if len(candidates) else candidates
        labels[picked] = tokens[picked]
        action = rng.random(len(picked))
        tokens = tokens.copy()
        tokens[picked[action < 0.8]] = self.tok.mask
        random_slots = picked[(action >= 0.8) & (action < 0.9)]
        # Indexing the sorted replacement ids keeps byte data's draws identical to integers(0, 256).
        tokens[random_slots] = self.replacements[rng.integers(0, len(self.replacements), len(random_slots))]

        pad = self.seq_length - n
        # tempo_ds.workload's batch format: the names of BertModel's forward arguments.
        return {
            "tokens": torch.from_numpy(numpy.pad(tokens, (0, pad), constant_values=self.tok.pad)),
            "tokentype_ids": torch.from_numpy(numpy.pad(types, (0, pad))),
            "attention_mask": torch.from_numpy(numpy.pad(numpy.ones(n, numpy.int64), (0, pad))),
            "labels": torch.from_numpy(numpy.where(labels < 0, 0, labels)),
            "loss_mask": torch.from_numpy((labels >= 0).astype(numpy.float32)),
            "is_random": torch.tensor(int(is_random)),
        }
