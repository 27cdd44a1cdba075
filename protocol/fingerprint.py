"""Tokenizer fingerprint: a stable hash both sides compute to prove they tokenise identically.

The hash covers the full token -> id map and the special tokens (with their ids), serialised canonically
(sorted, JSON), so it is independent of dict order, file layout and library version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex of a Hugging Face tokenizer's vocabulary and special tokens."""
    vocab = tokenizer.get_vocab()
    specials = sorted(
        {(str(tok), int(tokenizer.convert_tokens_to_ids(tok))) for tok in getattr(tokenizer, "all_special_tokens", [])}
    )
    payload = json.dumps(
        {"vocab": sorted((str(t), int(i)) for t, i in vocab.items()), "special": specials},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()
