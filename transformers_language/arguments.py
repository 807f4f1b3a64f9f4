"""The entry scripts' command lines: typed argument groups (dataclasses whose fields are the flags, with their
help text), parsed once; and one clear line for a flag of the paper's scripts that this project dropped
(naming what replaces it), instead of a bare "unrecognized arguments"."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import field, fields
from typing import TypeVar

T = TypeVar("T")

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


def arg(default=None, help: str = "", **options):
    """A dataclass field that is also a flag: its default, help text and argparse options (type, choices,
    action)."""
    return field(default=default, metadata={"help": help, "options": options})


def switch(help: str):
    """A dataclass field that is an on/off flag (store_true), off by default."""
    return arg(False, help, action="store_true")


def add_group(
    parser: argparse.ArgumentParser,
    group_class: type,
    title: str,
    changes: dict[str, dict] | None = None,
    after: dict[str, Callable[[argparse._ArgumentGroup], None]] | None = None,
    omit: tuple[str, ...] = (),
    before: Callable[[argparse._ArgumentGroup], None] | None = None,
) -> argparse._ArgumentGroup:
    """The fields of the dataclass `group_class` as the flags `--<field>` of one argument group. `changes`
    adjusts a field's argparse options for this script (another default or help text); `after[field]` adds
    flags that are not the group's own (e.g. the family's sequence-length flag) right after that field; `omit`
    names fields this script does not take (they keep their defaults in the typed group); `before` adds flags
    ahead of the group's own (e.g. the objective's)."""
    group = parser.add_argument_group(title)
    if before is not None:
        before(group)
    for item in fields(group_class):
        if item.name in omit:
            continue
        options = {"default": item.default, "help": item.metadata["help"], **item.metadata["options"]}
        options |= (changes or {}).get(item.name, {})
        if options.get("action") == "store_true":
            options.pop("default")
        group.add_argument(f"--{item.name}", **options)
        if item.name in (after or {}):
            after[item.name](group)
    return group


def parse_group(group_class: type[T], values) -> T:
    """The typed group of parsed flags (`values`: the parsed namespace, or any object with those attributes)."""
    if isinstance(values, group_class):
        return values
    return group_class(**{item.name: getattr(values, item.name, item.default) for item in fields(group_class)})
