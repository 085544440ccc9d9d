"""Tiny real ``transformers`` models built from configs (nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from pipeline.core.text import IGNORE, TokenWindow

VOCAB = 48


def tiny_model(family: str, seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    """A 2-layer model of the given family with a 48-token vocabulary."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "gpt2":
        cfg = GPT2Config(n_positions=64, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, **common)
        model = GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=64, **common)
        model = LlamaForCausalLM(cfg)
    elif family == "neox":
        cfg = GPTNeoXConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, **common)
        model = GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def random_sequences(n: int, seed: int = 0, min_len: int = 4, max_len: int = 12, prefix: str = "d") -> list[TokenWindow]:
    """Training-style sequences (every token after the first is a target) of varied length."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = tuple(torch.randint(2, VOCAB, (length,), generator=gen).tolist())
        out.append(TokenWindow(f"{prefix}{i}", 0, ids, ids))
    return out


def random_queries(n: int, seed: int = 100) -> list[TokenWindow]:
    """Query-style sequences: a prompt (unlabelled) followed by a labelled completion."""
    out = []
    for s in random_sequences(n, seed=seed, min_len=5, max_len=9, prefix="q"):
        cut = len(s.input_ids) // 2
        labels = (IGNORE,) * cut + s.input_ids[cut:]
        out.append(TokenWindow(s.doc_id, 0, s.input_ids, labels))
    return out
