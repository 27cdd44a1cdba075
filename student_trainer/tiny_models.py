"""Tiny real models built offline: a word-level tokenizer and a randomly initialised Qwen3.

Used by the tests, the benchmarks and the demo: nothing is downloaded. head_dim is 64 because vLLM's CPU
build supports it (16 fails), and the model loads unchanged in transformers and vLLM.
"""

from __future__ import annotations

import string
from pathlib import Path


def build_tokenizer(out_dir: str | Path, words: list[str] | None = None, n_filler: int = 400):
    """Word-level tokenizer over single characters, `\\boxed{` pieces and `n_filler` filler words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    base = list(string.digits + string.ascii_letters + "+-*/=()[]{}\\.,:;?!<>_^|#")
    vocab_list = specials + base + (words or []) + [f"w{i}" for i in range(n_filler)]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 2048,
    n_filler: int = 400,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a randomly initialised Qwen3ForCausalLM plus tokenizer to `out_dir`; returns the path."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = build_tokenizer(out, n_filler=n_filler)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tokenizer.save_pretrained(str(out))
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=64,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    # Wider than default init so the teacher's distributions are peaked, not near-uniform.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)  # (tied: the embeddings too)
    model.save_pretrained(str(out))
    return out
