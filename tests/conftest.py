"""Tiny BERT / OPT configs and helpers shared by the tests (CPU, 2 layers, hidden 32)."""

import pytest
import torch
from transformers import BertConfig, OPTConfig

from transformers_language import AttentionConfig

VOCAB = 97


TINY_CONFIGS = {
    "bert": (BertConfig, dict(intermediate_size=64)),
    "opt": (OPTConfig, dict(ffn_dim=64, word_embed_proj_dim=32, pad_token_id=1)),
}


def tiny_config(model_type: str, **overrides):
    config_class, specific = TINY_CONFIGS[model_type]
    shared = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
    )
    return config_class(**(shared | specific | overrides))


def batch(model_type: str, seq_len: int = 12, batch_size: int = 3, seed: int = 0, left_padding: bool = False):
    """Random ids with a padding mask: row 1 loses its last (or first) 4 tokens, row 2 its last 7."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=gen)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if left_padding:
        mask[1, :4] = 0
    else:
        mask[1, -4:] = 0
        mask[2, -7:] = 0
    return ids, mask


# Every softmax / gate combination the issue names, as AttentionConfig keyword sets.
VARIANTS = {
    "vanilla": {},
    "clipped": {"softmax": "clipped(-0.1:1.05)"},
    "alpha": {"alpha": 3.2, "train_seq_length": 128},
    "unconditional_per_head": {"gate_type": "unconditional_per_head", "init_prob": 0.25},
    "conditional_per_head": {"gate_type": "conditional_per_head"},
    "conditional_per_token": {"gate_type": "conditional_per_token", "init_prob": 0.25},
    "mlp": {"gate_type": "conditional_per_token", "gate_network": "mlp"},
    "mlp2": {"gate_type": "conditional_per_token", "gate_network": "mlp2"},
    "all_heads_linear": {"gate_type": "conditional_per_token", "gate_network": "all_heads_linear"},
    "fine_tuning": {"gate_type": "conditional_per_token", "init_prob": 0.25, "fine_tuning": True},
    "clipped+gate": {"softmax": "clipped(-0.03:1.03)", "gate_type": "conditional_per_token"},
    "skip_attn": {"skip_attn": True},
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> AttentionConfig:
    return AttentionConfig(**VARIANTS[request.param])


@pytest.fixture(params=["bert", "opt"])
def model_type(request) -> str:
    return request.param
