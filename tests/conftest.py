"""Tiny BERT / OPT / Llama configs and helpers shared by the tests (CPU, 2 layers, hidden 32)."""

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, LlamaConfig, OPTConfig

from transformers_language import AttentionConfig
from transformers_language.data.sources import shared_folder
from transformers_language.families import FAMILIES

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would flood the test log
# A subprocess killed by a fatal signal (an abort in a native library, a segfault) prints every thread's Python
# stack to its stderr, which the failing test's message carries: the signal alone does not say where it came from.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One pytest-xdist worker per core: the tiny models gain nothing from a second intra-op thread, and two
    # workers with two threads each would oversubscribe the cores. The tests' subprocesses inherit the setting.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

VOCAB = 97


TINY_CONFIGS = {
    "bert": (BertConfig, dict(intermediate_size=64)),
    "opt": (OPTConfig, dict(ffn_dim=64, word_embed_proj_dim=32, pad_token_id=1)),
    # Grouped-query attention (2 key-value heads for 4 query heads), untied head, as the llama presets.
    "llama": (LlamaConfig, dict(intermediate_size=64, num_key_value_heads=2, pad_token_id=1)),
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


# Every normaliser / gate / learned key combination the issues name, as AttentionConfig keyword sets.
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
    "softmax1": {"softmax": "softmax1"},
    "clipped_softmax1": {"softmax": "clipped_softmax1(-0.1:1.05)"},
    "sink": {"softmax": "sink"},
    "softpick": {"softmax": "softpick"},
    "sigmoid": {"softmax": "sigmoid", "train_seq_length": 16},
    "bias_kv": {"bias_kv": True},
    "headwise": {"gate_type": "headwise"},
    "elementwise": {"gate_type": "elementwise"},
    "sink+bias_kv+elementwise": {"softmax": "clipped_sink(-0.05:1)", "bias_kv": True, "gate_type": "elementwise"},
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> AttentionConfig:
    return AttentionConfig(**VARIANTS[request.param])


@pytest.fixture(params=["bert", "opt"])
def model_type(request) -> str:
    return request.param


# Local data and tokenizers (never copied into the project): ../shared beside the checkout, or $OFT_SHARED.
SHARED = shared_folder()
TRAIN_TEXT = SHARED / "data" / "wikitext-2" / "test.txt"
VALID_TEXT = SHARED / "data" / "wikitext-2" / "valid.txt"
TOKENIZERS = {
    "bert": SHARED / "tokenizers" / "bert-base-uncased",
    "opt": SHARED / "tokenizers" / "opt-bpe-8k",
    "llama": SHARED / "tokenizers" / "opt-bpe-8k",
}
TINY_YAML = {
    "bert": "hidden_size: 32\nnum_hidden_layers: 2\nnum_attention_heads: 4\nintermediate_size: 64\n"
    "max_position_embeddings: 64\n",
    "opt": "hidden_size: 32\nnum_hidden_layers: 2\nnum_attention_heads: 4\nffn_dim: 64\nmax_position_embeddings: 64\n",
    "llama": "hidden_size: 32\nnum_hidden_layers: 2\nnum_attention_heads: 4\nnum_key_value_heads: 2\n"
    "intermediate_size: 64\nmax_position_embeddings: 64\n",
}


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenized-data cache for the whole session (each split is tokenized once)."""
    return tmp_path_factory.mktemp("data_cache")


def train_argv(model_type: str, output_dir: Path, data_cache: Path, *extra: str, steps: int = 4) -> list[str]:
    """Arguments of a few-step run of a tiny model on the local WikiText-2 text."""
    config = output_dir.parent / f"{model_type}-tiny.yaml"
    config.write_text(TINY_YAML[model_type])
    seq_flag = f"--{FAMILIES[model_type].sequence.name}"
    return [
        "--config_path", str(config),
        "--tokenizer_name", str(TOKENIZERS[model_type]),
        "--train_file", str(TRAIN_TEXT),
        "--validation_file", str(VALID_TEXT),
        "--train_percentage", "10",
        "--validation_percentage", "5",
        seq_flag, "32",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "32",
        "--learning_rate", "1e-3",
        "--max_train_steps", str(steps),
        "--data_cache_dir", str(data_cache),
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def run_main(model_type: str, argv: list[str]) -> dict:
    import run_clm
    import run_llama
    import run_mlm

    return {"bert": run_mlm, "opt": run_clm, "llama": run_llama}[model_type].main(argv)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


class _Interrupted(Exception):
    pass


def assert_resume_repeats_run(train: Callable[..., dict], tmp_path: Path, monkeypatch, *extra: str) -> Path:
    """`train(output_dir, *flags)` runs a training script. Train 6 steps straight; train again, killed right after
    the step-3 checkpoint, and resume from it: the resumed run must log the same losses and end with the same
    weights, bit for bit. `extra` must checkpoint every 3 steps. Returns the straight run's directory."""
    import transformers_language.training.loop as training

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *extra, "--max_train_steps", "6")
    real_save = training.save_checkpoint

    def save_then_die(accelerator, output_dir, step, *rest):
        path = real_save(accelerator, output_dir, step, *rest)
        if step == 3:
            raise _Interrupted
        return path

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(_Interrupted):
        train(resumed, *extra, "--max_train_steps", "6")
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    assert len(read_log(resumed)) == 3 and not (resumed / "all_results.json").exists()

    train(resumed, *extra, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert [r["loss"] for r in read_log(resumed)] == [r["loss"] for r in read_log(straight)]  # bit for bit
    first, second = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(first[key], second[key]) for key in first)
    return straight


def text_trainer(model_type: str, data_cache: Path) -> Callable[..., dict]:
    """`train(output_dir, *flags)` for `assert_resume_repeats_run`: a tiny model on the local text."""
    return lambda output_dir, *flags: run_main(model_type, train_argv(model_type, output_dir, data_cache, *flags))


@pytest.fixture(scope="session")
def planted() -> dict:
    """The planted-outlier tiny models of tests/planted.py, trained once per session (treat them as read-only)."""
    from tests.planted import planted_models

    return planted_models()
