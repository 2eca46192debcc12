"""The one way texts become encoder inputs — for the engine (and so every door), `eval`,
`predict` and the benchmarks: each text bounded in bytes, cut before the tokenizer sees it
(so a huge text costs no more than one of `max_tokens` tokens), tokenized with truncation or
refused when longer, then padded per batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ticketserve.core.backbone import Backbone
from ticketserve.core.errors import InvalidArgument

# A text is cut to this many characters per allowed token before tokenizing: far above what
# real text needs (English averages 4–5 per WordPiece/BPE token), so truncation gives the same
# tokens as tokenizing the whole text; only junk (a token per 24+ characters) sees fewer.
CHARS_PER_TOKEN = 24
MAX_TEXT_BYTES = 256 * 1024
OFFSETS, WORD_IDS = "offset_mapping", "word_ids"
SPANS = (OFFSETS, WORD_IDS)  # a feature's entries that are not encoder inputs


@dataclass
class Tokenization:
    tokenizer: object
    max_tokens: int  # per text (with its pair), special tokens included
    max_text_bytes: int = MAX_TEXT_BYTES
    truncate: bool = True  # longer texts are cut (True) or refused (False)

    @classmethod
    def for_backbone(cls, backbone: Backbone, max_tokens: int, max_text_bytes: int = MAX_TEXT_BYTES,
                     truncate: bool = True) -> Tokenization:
        """Within what the backbone can take, whatever was asked for."""
        limit = min(max_tokens, backbone.tokenizer.model_max_length, backbone.config.max_position_embeddings - 2)
        return cls(backbone.tokenizer, limit, max_text_bytes, truncate)

    @property
    def max_chars(self) -> int:
        return self.max_tokens * CHARS_PER_TOKEN

    def features(self, texts: list[str], pairs: list[str] | None = None, spans: bool = False) -> list[dict[str, list]]:
        """Each text's (and pair's) token ids, unpadded; with `spans`, also each piece's character
        span in the text (`offset_mapping`, (0, 0) for special tokens) and its word (`word_ids`,
        the tokenizer's pre-split words) — what token classification answers in."""
        if pairs is not None and len(pairs) != len(texts):
            raise InvalidArgument(f"{len(texts)} texts but {len(pairs)} text pairs")
        texts = [self._bounded(text, i, "text") for i, text in enumerate(texts)]
        if pairs is not None:
            pairs = [self._bounded(pair, i, "text_pair") for i, pair in enumerate(pairs)]
        encoded = self.tokenizer(texts, pairs, truncation=self.truncate, return_offsets_mapping=spans,
                                 max_length=self.max_tokens if self.truncate else None)
        features = [{k: encoded[k][i] for k in encoded.keys()} for i in range(len(texts))]
        if spans:
            for i, feature in enumerate(features):
                feature[WORD_IDS] = encoded.word_ids(i)
        for i, feature in enumerate(features):
            if len(feature["input_ids"]) > self.max_tokens:
                raise InvalidArgument(f"input {i} has {len(feature['input_ids'])} tokens; the limit is {self.max_tokens}")
        return features

    def pad(self, features: list[dict[str, list]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """One batch of features' encoder inputs, padded to its longest (spans stay behind)."""
        inputs = self.tokenizer.pad([{k: v for k, v in f.items() if k not in SPANS} for f in features],
                                    return_tensors="pt")
        return {k: v.to(device) for k, v in inputs.items()}

    def __call__(self, texts: list[str], pairs: list[str] | None = None,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return self.pad(self.features(texts, pairs), device)

    def _bounded(self, text: str, i: int, field: str) -> str:
        """The text within the byte limit, cut to what its first `max_tokens` tokens can come
        from before the tokenizer sees it (the tokenizer's cost grows with the whole text): at
        most CHARS_PER_TOKEN characters per token, ending at a word boundary when one is near."""
        try:
            size = len(text) if text.isascii() else len(text.encode())
        except UnicodeEncodeError:
            raise InvalidArgument(f"input {i}: {field} is not valid Unicode (a lone surrogate)") from None
        if size > self.max_text_bytes:
            raise InvalidArgument(f"input {i}: {field} has {size:,} bytes; the limit is {self.max_text_bytes:,}")
        if len(text) <= self.max_chars:
            return text
        if not self.truncate:
            raise InvalidArgument(f"input {i}: {field} has {len(text):,} characters, more than {self.max_tokens} "
                                  f"tokens can hold ({self.max_chars:,}); shorten it or ask a server that truncates")
        window = text[:self.max_chars]
        space = max(window.rfind(c, 3 * self.max_chars // 4) for c in " \t\n\r")
        return window[:space] if space > 0 else window
