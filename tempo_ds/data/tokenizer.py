"""Tokenizers for the datasets: ByteTokenizer needs no vocabulary file (UTF-8 bytes are ids 0..255,
special tokens follow; any text round-trips); HFTokenizer reads a Hugging Face tokenizer from a
local folder (tokenizer.json, GPT-2 vocab.json + merges.txt, or BERT vocab.txt). Nothing is
downloaded."""
import json
from pathlib import Path

import numpy

from ..megatron.compat import tokenizer_base

SPECIALS = ("eod", "pad", "cls", "sep", "mask")


class _SpecialIdsTokenizer(tokenizer_base()):
    """What both tokenizers share: ids of the special tokens in `self._ids` (name -> id, names
    from SPECIALS), `self._vocab_size`, and the attributes Megatron's datasets read from them."""

    @staticmethod
    def _check_special_names(special_ids):
        unknown = set(special_ids) - set(SPECIALS)
        if unknown:
            raise ValueError(f"unknown special token(s) {sorted(unknown)}; known: {SPECIALS}")

    @property
    def inv_vocab(self):
        return {i: t for t, i in self.vocab.items()}

    @property
    def vocab_size(self):
        return self._vocab_size

    @property
    def special_ids(self):
        """{name: id} of the specials this tokenizer has (after overrides)."""
        return dict(self._ids)

    def _special(self, name):
        if name not in self._ids:
            raise NotImplementedError(
                f"{self._describe()} has no {name} token (looked for "
                f"{', '.join(HF_SPECIAL_TOKENS[name])}); give one with --special-ids {name}=ID")
        return self._ids[name]

    def _describe(self):
        return type(self).__name__

    eod = property(lambda self: self._special("eod"))
    pad = property(lambda self: self._special("pad"))
    cls = property(lambda self: self._special("cls"))
    sep = property(lambda self: self._special("sep"))
    mask = property(lambda self: self._special("mask"))


class ByteTokenizer(_SpecialIdsTokenizer):
    """Bytes -> ids 0..255; eod=256, pad=257, cls=258, sep=259, mask=260.

    Megatron's datasets read `eod`, `pad`, `cls`, `sep`, `mask` and `vocab_size` from it.
    `special_ids` overrides the ids (and `vocab_size` the size) for data tokenized elsewhere, e.g.
    GPT-2 BPE data preprocessed with Megatron's tools: ByteTokenizer(vocab_size=50257, eod=50256).
    """

    def __init__(self, vocab_size=None, **special_ids):
        super().__init__()
        self._check_special_names(special_ids)
        self._ids = {name: 256 + i for i, name in enumerate(SPECIALS)}
        self._ids.update(special_ids)
        self._vocab_size = vocab_size if vocab_size is not None else 256 + len(SPECIALS)

    def tokenize(self, text):
        return numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8).astype(numpy.int32)

    def detokenize(self, ids):
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    @property
    def vocab(self):
        return {**{bytes([i]).decode("latin-1"): i for i in range(256)},
                **{f"<{n}>": i for n, i in self._ids.items()}}


def parse_special_ids(text):
    """"eod=50256,pad=0" -> {"eod": 50256, "pad": 0} (the --special-ids argument)."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in SPECIALS or not value.strip().isdigit():
            raise ValueError(f"--special-ids: expected name=id with name in {SPECIALS}, got {item!r}")
        out[name.strip()] = int(value)
    return out


# The token strings that stand for each special id, in order of preference: WordPiece (BERT),
# GPT-2 byte-level BPE, RoBERTa-style BPE. WordPiece has no end-of-document token; [SEP] ends a
# segment, and being special it is never masked nor drawn by the BERT dataset.
HF_SPECIAL_TOKENS = {
    "eod": ("<|endoftext|>", "</s>", "[SEP]"),
    "pad": ("[PAD]", "<pad>"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
}
# The files a tokenizer folder may hold, in the order they are tried.
HF_LAYOUTS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",))


def _load_hf(folder):
    """(tokenizers.Tokenizer, layout) from `folder`: a tokenizer.json, else GPT-2 BPE files
    (vocab.json + merges.txt), else a BERT WordPiece vocab.txt. Nothing is downloaded."""
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    except ImportError as e:
        raise ImportError("Hugging Face tokenizers need the `tokenizers` package: "
                          "pip install 'tempo_ds[data]'") from e
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--tokenizer-dir {folder}: no such folder")
    layout = next((names for names in HF_LAYOUTS if all((folder / n).is_file() for n in names)), None)
    if layout is None:
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise ValueError(f"--tokenizer-dir {folder}: holds no known tokenizer file; expected "
                         f"{' or '.join(' + '.join(n) for n in HF_LAYOUTS)}, found {found}")
    if layout == ("tokenizer.json",):
        return Tokenizer.from_file(str(folder / "tokenizer.json")), layout
    if layout == ("vocab.json", "merges.txt"):
        # GPT-2's own set-up: byte-level pre-tokenizer without a prefix space, byte-level decoder.
        tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        # BERT: lower-cases unless tokenizer_config.json says do_lower_case=false (BertTokenizer's default).
        config = folder / "tokenizer_config.json"
        lower = json.loads(config.read_text()).get("do_lower_case", True) if config.is_file() else True
        tok = Tokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lower)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
    # As in Hugging Face's GPT2/Bert tokenizers: a special token in the text stays one token
    # ("[MASK]", not "[", "mask", "]"). A tokenizer.json lists its own.
    vocab = tok.get_vocab()
    names = {t for tokens in HF_SPECIAL_TOKENS.values() for t in tokens} | {"[UNK]"}
    tok.add_special_tokens(sorted(t for t in names if t in vocab))
    return tok, layout


class HFTokenizer(_SpecialIdsTokenizer):
    """A Hugging Face `tokenizers` tokenizer read from a local folder, with the attributes
    Megatron's datasets and the trainer read (vocab_size, eod, pad, cls, sep, mask).

    Special ids come from the tokenizer's own special tokens (HF_SPECIAL_TOKENS); `special_ids`
    overrides them and `vocab_size` the size. A special it lacks (GPT-2 BPE has no [MASK]) raises
    NotImplementedError naming it when read, which Megatron's GPT dataset tolerates for pad.
    tokenize() adds no special token (no [CLS]/[SEP] template): the datasets add their own.
    """

    def __init__(self, folder, vocab_size=None, **special_ids):
        self._check_special_names(special_ids)
        self.folder = str(Path(folder).resolve())
        super().__init__(self.folder)
        self._tok, self.layout = _load_hf(self.folder)
        self._ids = {}
        for name, tokens in HF_SPECIAL_TOKENS.items():
            found = [self._tok.token_to_id(t) for t in tokens if self._tok.token_to_id(t) is not None]
            if found:
                self._ids[name] = found[0]
        self._ids.update(special_ids)
        self._vocab_size = vocab_size if vocab_size is not None else self._tok.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text):
        return numpy.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=numpy.int32)

    def tokenize_batch(self, texts):
        """tokenize() of each text, in one call into the Rust library (faster for short texts)."""
        return [numpy.asarray(e.ids, dtype=numpy.int32)
                for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def detokenize(self, ids):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self):
        return self._tok.get_vocab(with_added_tokens=True)

    def _describe(self):
        return f"tokenizer {self.folder}"
