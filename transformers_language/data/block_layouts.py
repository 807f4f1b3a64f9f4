"""Block layouts: how a split's tokenized texts become fixed-length blocks (the BLOCK_LAYOUTS registry), and
the record of a model's layout saved beside its weights.

  stream     every text carries the tokenizer's special tokens; the token stream is cut into blocks per batch
             of GROUP_BATCH_SIZE texts (HF's `group_texts`, the paper's code). OPT's `</s>` then sits wherever
             a line starts: at position 0 in ~1% of blocks, and ~1.3 times inside each.
  bos_first  plain tokens; the whole split's stream is cut into bodies, each framed by the tokenizer's special
             tokens (OPT: `</s>` + body; BERT: `[CLS]` + body + `[SEP]`), so a content-free token sits at
             position 0 of every block and nowhere else: a fixed key where heads that want to do nothing
             park their attention, as in pre-training on long documents.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..errors import UsageError

logger = logging.getLogger(__name__)

GROUP_BATCH_SIZE = 1000  # stream layout: texts per grouping batch; each batch's tail shorter than a block is dropped


@dataclass(frozen=True)
class BlockLayout:
    """How tokenized texts become blocks: what the tokenizer adds to each text, and how blocks are framed."""

    description: str
    special_tokens_per_text: bool  # stream: each text carries its special tokens; bos_first: none
    framed_blocks: bool  # bos_first: every block gets the tokenizer's special tokens around its body


BLOCK_LAYOUTS = {
    "stream": BlockLayout("lines with their special tokens, one stream cut into blocks (HF group_texts)", True, False),
    "bos_first": BlockLayout("one stream of plain tokens, each block framed as one text ([BOS] + body)", False, True),
}
DEFAULT_BLOCK_LAYOUT = "stream"


LAYOUT_RECORD = "block_layout.json"  # written beside every saved model: the layout it was trained on


def layout_record(block_layout: str) -> dict[str, dict]:
    """The file (name -> JSON values) that records a model's training layout beside its weights."""
    return {LAYOUT_RECORD: {"block_layout": block_layout}}


def resolve_block_layout(flag: str | None, model_dir: str) -> tuple[str, str]:
    """(layout, where it comes from) of an evaluation: `--block_layout` (`flag`) when given, else the one
    recorded beside the checkpoint, else `stream` (a model not trained here, e.g. from the hub); logged."""
    record = Path(model_dir) / LAYOUT_RECORD
    if flag is not None:
        layout, source = flag, "--block_layout"
    elif record.is_file():
        try:
            layout = json.loads(record.read_text())["block_layout"]
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(f"{record} is corrupt ({error}); pass --block_layout to choose the layout.") from error
        get_block_layout(layout)
        source = f"the checkpoint's {LAYOUT_RECORD}"
    else:
        layout, source = DEFAULT_BLOCK_LAYOUT, f"the default (no {LAYOUT_RECORD} beside the checkpoint)"
    logger.info("Block layout %s, from %s", layout, source)
    return layout, source


def get_block_layout(name: str) -> BlockLayout:
    if name not in BLOCK_LAYOUTS:
        raise UsageError(f"Unknown block layout {name!r}; valid layouts: {', '.join(BLOCK_LAYOUTS)}.")
    return BLOCK_LAYOUTS[name]


def block_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special tokens the tokenizer puts around one text (OPT: [</s>], []; BERT: [CLS],
    [SEP]), read from how it frames a short text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    starts = [i for i in range(len(framed) - len(plain) + 1) if framed[i : i + len(plain)] == plain]
    if len(starts) != 1:
        raise UsageError(f"Cannot read the special-token frame of the tokenizer {tokenizer.name_or_path!r}.")
    return framed[: starts[0]], framed[starts[0] + len(plain) :]


def _group(batch: dict, seq_length: int) -> dict:
    stream = [token for ids in batch["input_ids"] for token in ids]
    usable = len(stream) - len(stream) % seq_length
    return {"input_ids": [stream[i : i + seq_length] for i in range(0, usable, seq_length)]}


class _FramedBlocks:
    """A batched map over the tokenized rows, in order, yielding blocks of prefix + body + suffix: the bodies
    are cut from the whole split's stream (what a batch leaves over carries into the next one), so only the
    stream's last, partial body is dropped. Stateful, hence run in one process."""

    def __init__(self, prefix: list[int], suffix: list[int], seq_length: int):
        self.prefix, self.suffix = prefix, suffix
        self.body_length = seq_length - len(prefix) - len(suffix)
        self.pending: list[int] = []

    def __call__(self, batch: dict) -> dict:
        for ids in batch["input_ids"]:
            self.pending.extend(ids)
        usable = len(self.pending) - len(self.pending) % self.body_length
        bodies = [self.pending[i : i + self.body_length] for i in range(0, usable, self.body_length)]
        del self.pending[:usable]
        return {"input_ids": [self.prefix + body + self.suffix for body in bodies]}


def build_blocks(tokenized: Dataset, tokenizer, layout: BlockLayout, seq_length: int, split: str) -> Dataset:
    """The split's blocks of `seq_length` tokens in `layout`, from its tokenized texts (in one process)."""
    if not layout.framed_blocks:
        group = partial(_group, seq_length=seq_length)
    else:
        prefix, suffix = block_frame(tokenizer)
        if seq_length <= len(prefix) + len(suffix):
            raise UsageError(
                f"A {seq_length}-token block leaves no room beside its {len(prefix) + len(suffix)} special tokens; "
                "use a longer sequence length."
            )
        group = _FramedBlocks(prefix, suffix, seq_length)
    return tokenized.map(
        group, batched=True, batch_size=GROUP_BATCH_SIZE, load_from_cache_file=False, desc=f"Grouping {split}"
    )
