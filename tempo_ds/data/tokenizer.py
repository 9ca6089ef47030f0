"""A byte-level tokenizer that needs no vocabulary file: UTF-8 bytes are ids 0..255, special tokens
follow. Any text round-trips; nothing is downloaded."""
import numpy

from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

SPECIALS = ("eod", "pad", "cls", "sep", "mask")


class ByteTokenizer(MegatronLegacyTokenizer):
    """Bytes -> ids 0..255; eod=256, pad=257, cls=258, sep=259, mask=260.

    Megatron's datasets read `eod`, `pad`, `cls`, `sep`, `mask` and `vocab_size` from it.
    `special_ids` overrides the ids (and `vocab_size` the size) for data tokenized elsewhere, e.g.
    GPT-2 BPE data preprocessed with Megatron's tools: ByteTokenizer(vocab_size=50257, eod=50256).
    """

    def __init__(self, vocab_size=None, **special_ids):
        super().__init__()
        unknown = set(special_ids) - set(SPECIALS)
        if unknown:
            raise ValueError(f"unknown special token(s) {sorted(unknown)}; known: {SPECIALS}")
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

    @property
    def inv_vocab(self):
        return {i: t for t, i in self.vocab.items()}

    @property
    def vocab_size(self):
        return self._vocab_size

    eod = property(lambda self: self._ids["eod"])
    pad = property(lambda self: self._ids["pad"])
    cls = property(lambda self: self._ids["cls"])
    sep = property(lambda self: self._ids["sep"])
    mask = property(lambda self: self._ids["mask"])


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
