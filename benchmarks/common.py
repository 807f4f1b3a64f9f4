"""What the benchmarks share: where the repo and ../shared are, the BERT-small / OPT-small setups on
WikiText-2, the child-process environment (2 threads, no progress bars) and a training run's arguments."""

from __future__ import annotations

import os
from pathlib import Path

from transformers_language.data.sources import shared_folder
from transformers_language.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
SHARED = shared_folder()
DATA = SHARED / "data" / "wikitext-2"
SETUPS = {
    "bert": {"config": "bert-small.yaml", "tokenizer": "bert-base-uncased", "batch": 32},
    "opt": {"config": "opt-small.yaml", "tokenizer": "opt-bpe-8k", "batch": 16},
}
for _model, _setup in SETUPS.items():  # the objective (mlm / clm) of the family's scripts
    _setup["script"] = FAMILIES[_model].objective
SEQ_LENGTH = 128
CHILD_ENV = os.environ | {"OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def seq_flag(model: str) -> str:
    return f"--{FAMILIES[model].sequence.name}"


def train_argv(model: str, steps: int, output_dir: str, cache: str) -> list[str]:
    """run_mlm / run_clm arguments: the small model on test.txt, 1% of valid.txt for its final evaluation."""
    setup = SETUPS[model]
    return [
        "--config_path", str(REPO / "model_configs" / setup["config"]),
        "--tokenizer_name", str(SHARED / "tokenizers" / setup["tokenizer"]),
        "--train_file", str(DATA / "test.txt"),
        "--validation_file", str(DATA / "valid.txt"),
        "--validation_percentage", "1",
        seq_flag(model), str(SEQ_LENGTH),
        "--per_device_train_batch_size", str(setup["batch"]),
        "--learning_rate", "1e-4",
        "--max_train_steps", str(steps),
        "--output_dir", output_dir,
        "--data_cache_dir", cache,
    ]  # fmt: skip


def stock_step_seconds(net, loader, learning_rate: float, steps: int) -> list[float]:
    """Seconds of each of `steps` plain AdamW steps (clip 1.0) of a stock HF model on `loader`'s batches: the
    HF-example loop the benchmarks compare against."""
    import time

    import torch

    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate)
    net.train()
    seconds, batches = [], iter(loader)
    for _ in range(steps):
        start = time.perf_counter()
        loss = net(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()
        seconds.append(time.perf_counter() - start)
    return seconds
