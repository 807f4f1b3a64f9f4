"""Parsing the entry scripts' command lines, with one clear line for a flag of the paper's scripts that this
project dropped (naming what replaces it), instead of a bare "unrecognized arguments"."""

from __future__ import annotations

import argparse

# Flag of the paper's scripts -> (scripts it belonged to, or None for all; what to do instead).
DROPPED_FLAGS: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "--pad_to_max_length": (None, "blocks always hold exactly the sequence length, so nothing is padded; drop it"),
    "--use_slow_tokenizer": (None, "the fast (Rust) tokenizer is always used; drop it"),
    "--tqdm_update_interval": (
        None,
        "progress bars pace themselves; set TQDM_MININTERVAL=SECONDS (or TQDM_DISABLE=1) instead",
    ),
    "--max_seq_length": (("run_clm.py",), "OPT's sequence length is --block_size"),
}


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`; unknown arguments are an error that names what replaces a dropped flag."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        hints = []
        for item in unknown:
            flag = item.split("=", 1)[0]
            scripts, fix = DROPPED_FLAGS.get(flag, ((), ""))
            if scripts is None or parser.prog in scripts:
                hints.append(f"{flag} of the paper's scripts is not used here: {fix}")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + "".join(f"; {hint}" for hint in hints))
    return args
