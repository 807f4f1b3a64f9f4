"""Tiny BERT / OPT models with a planted outlier channel (the post-training tests' instrument): trained for 300
steps on a 3-successor Markov chain, then one LayerNorm channel of every layer scaled up. Built once per
session (the `planted` fixture in conftest.py)."""

import math

import torch

from tests.conftest import tiny_config
from transformers_language import AttentionConfig, build_model

VOCAB, HIDDEN, CHANNEL = 97, 48, 5
# The planted factor per family: BERT's post-LN residual carries the outlier into the next LayerNorm (the model
# itself changes; its FP perplexity is the reference); OPT's is function-preserving (the next Linear's column is
# divided by it), so only the quantizer sees it and it takes a larger factor to hurt 8 bits.
FACTORS = {"bert": 50.0, "opt": 300.0}


def markov_ids(count: int, length: int, seed: int) -> torch.Tensor:
    """Sequences of a fixed random Markov chain with three successors per token (ideal perplexity 3)."""
    successors = torch.randint(3, VOCAB, (VOCAB, 3), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.empty(count, length, dtype=torch.long)
    ids[:, 0] = torch.randint(3, VOCAB, (count,), generator=generator)
    for t in range(1, length):
        ids[:, t] = successors[ids[:, t - 1], torch.randint(0, 3, (count,), generator=generator)]
    return ids


def loss(model, model_type: str, ids: torch.Tensor, seed: int) -> torch.Tensor:
    if model_type == "opt":
        return model(input_ids=ids, labels=ids).loss
    masked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.15
    return model(input_ids=torch.where(masked, 2, ids), labels=torch.where(masked, ids, -100)).loss


@torch.no_grad()
def perplexity(model, model_type: str) -> float:
    return math.exp(loss(model, model_type, markov_ids(64, 32, 7), 1).item())


def planted_models() -> dict:
    """Per family, the trained tiny model with channel CHANNEL of one LayerNorm per layer scaled up (gamma and
    beta): the FFN input (BERT attention.output.LayerNorm, OPT final_layer_norm)."""
    models = {}
    for model_type in ("bert", "opt"):
        torch.manual_seed(0)
        config = tiny_config(
            model_type, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, ffn_dim=2 * HIDDEN, word_embed_proj_dim=HIDDEN
        )
        model = build_model(config, AttentionConfig())
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(300):
            value = loss(model, model_type, markov_ids(32, 32, 1000 + step), step)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        factor = FACTORS[model_type]
        with torch.no_grad():
            for layer in model.transformer_layers():
                norm, consumer = (
                    (layer.final_layer_norm, layer.fc1)
                    if model_type == "opt"
                    else (layer.attention.output.LayerNorm, layer.intermediate.dense)
                )
                norm.weight[CHANNEL] *= factor
                norm.bias[CHANNEL] *= factor
                consumer.weight[:, CHANNEL] /= factor
        models[model_type] = model.eval()
    return models
