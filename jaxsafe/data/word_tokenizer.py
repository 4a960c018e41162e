"""A word-level tokenizer with CLIP's framing, for the miniature text-to-image test bed.

CLIP's tokenizer (Radford et al., 2021) frames a prompt as ``[SOT] tokens [EOT]`` padded to a
fixed context length (77 in Stable Diffusion); the text encoder's pooled output is the hidden
state at the EOT token. Here the tokens are whole words of a small closed vocabulary, and ids are
laid out as in CLIP's vocabulary, where SOT and EOT are the two largest ids (49406, 49407):

    PAD = 0,  words = 1 .. n,  SOT = n + 1,  EOT = n + 2 = vocab_size − 1.

So EOT is the largest id in every sequence and both pooling rules of Hugging Face's
``CLIPTextModel`` pick the same position: ``argmax(input_ids)`` (the legacy rule, used when
``eos_token_id == 2``) and ``first index where input_ids == eos_token_id``.

Deviation from CLIP: PAD is a separate id 0 (SD 1.x pads with EOT, SD 2.x with id 0; the causal
attention mask makes the EOT state independent of what follows either way), and a prompt longer
than ``max_length`` raises instead of being truncated, since truncation could silently cut the
concept word an erasure test is about.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

__all__ = ["WordTokenizer"]

PAD, SOT, EOT = "<|pad|>", "<|startoftext|>", "<|endoftext|>"
VOCAB_FILE, CONFIG_FILE = "vocab.json", "tokenizer_config.json"


class WordTokenizer:
    """Lower-cases, splits on white space, maps each word to its id; see the module docstring."""

    def __init__(self, words: Sequence[str], max_length: int = 12):
        words = list(words)
        bad = [
            w
            for w in words
            if not w or w != w.lower() or any(c.isspace() for c in w) or w in (PAD, SOT, EOT)
        ]
        if bad:
            raise ValueError(
                f"words must be non-empty lower-case words without spaces and not "
                f"special tokens; got {bad}"
            )
        if len(set(words)) != len(words):
            raise ValueError(
                f"words must be distinct; duplicates: "
                f"{sorted({w for w in words if words.count(w) > 1})}"
            )
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for SOT and EOT), got {max_length}")
        self.words = tuple(words)
        self.max_length = int(max_length)
        self.vocab = {
            PAD: 0,
            **{w: i + 1 for i, w in enumerate(words)},
            SOT: len(words) + 1,
            EOT: len(words) + 2,
        }
        self._inverse = {i: w for w, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    pad_token_id = property(lambda self: self.vocab[PAD])
    bos_token_id = property(lambda self: self.vocab[SOT])
    eos_token_id = property(lambda self: self.vocab[EOT])

    def encode(self, text: str) -> np.ndarray:
        """int32 (max_length,): ``[SOT] word ids [EOT] [PAD] ...``; "" gives ``[SOT][EOT]``."""
        words = text.lower().split()
        unknown = [w for w in words if w not in self.vocab or w in (PAD, SOT, EOT)]
        if unknown:
            raise ValueError(
                f"unknown word {unknown[0]!r} in {text!r}: not in the test-bed "
                f"tokenizer's vocabulary ({', '.join(self.words)})"
            )
        if len(words) + 2 > self.max_length:
            raise ValueError(
                f"{text!r} has {len(words)} words; at most max_length - 2 = "
                f"{self.max_length - 2} fit"
            )
        ids = [self.bos_token_id] + [self.vocab[w] for w in words] + [self.eos_token_id]
        return np.asarray(ids + [self.pad_token_id] * (self.max_length - len(ids)), np.int32)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """(max_length,) for one text, (N, max_length) for a list."""
        if isinstance(texts, str):
            return self.encode(texts)
        return np.stack([self.encode(t) for t in texts]).reshape(-1, self.max_length)

    def decode(self, ids) -> str:
        """The words between SOT and the first EOT."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if not ids or ids[0] != self.bos_token_id or self.eos_token_id not in ids:
            raise ValueError(
                f"ids must start with SOT={self.bos_token_id} and contain "
                f"EOT={self.eos_token_id}, got {ids}"
            )
        body = ids[1 : ids.index(self.eos_token_id)]
        bad = [
            i for i in body if i not in self._inverse or i in (self.pad_token_id, self.bos_token_id)
        ]
        if bad:
            raise ValueError(f"ids {bad} are not word ids (1..{len(self.words)})")
        return " ".join(self._inverse[i] for i in body)

    def save(self, folder: str) -> None:
        """Writes ``vocab.json`` (token -> id) and ``tokenizer_config.json`` into ``folder``."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, VOCAB_FILE), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, indent=1)
        with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "tokenizer_class": "WordTokenizer",
                    "model_max_length": self.max_length,
                    "pad_token": PAD,
                    "bos_token": SOT,
                    "eos_token": EOT,
                },
                f,
                indent=1,
            )

    @classmethod
    def load(cls, folder: str) -> WordTokenizer:
        """The tokenizer saved in ``folder`` by :meth:`save`."""
        paths = [os.path.join(folder, n) for n in (VOCAB_FILE, CONFIG_FILE)]
        for p in paths:
            if not os.path.exists(p):
                raise FileNotFoundError(
                    f"tokenizer file {p!r} not found (written by WordTokenizer.save)"
                )
        from jaxsafe.files import read_json

        vocab, config = (read_json(p, "a WordTokenizer file") for p in paths)
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise ValueError(f"{paths[0]}: expected a JSON object word -> integer id")
        if not isinstance(config, dict) or not isinstance(config.get("model_max_length"), int):
            raise ValueError(
                f"{paths[1]}: expected a JSON object with an integer 'model_max_length'"
            )
        n = len(vocab) - 3
        words = sorted((w for w in vocab if w not in (PAD, SOT, EOT)), key=vocab.get)
        tok = cls(words, config["model_max_length"])
        if tok.vocab != vocab:
            raise ValueError(
                f"{paths[0]}: ids must be PAD=0, words 1..{n}, SOT={n + 1}, "
                f"EOT={n + 2}; got {vocab}"
            )
        return tok
