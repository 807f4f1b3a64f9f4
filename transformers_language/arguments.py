"""The entry scripts' command lines: typed argument groups (dataclasses whose fields are the flags, with their
help text and their range checks), parsed once into `Flags`; and one clear line for a flag of the paper's
scripts that this project dropped (naming what replaces it), instead of a bare "unrecognized arguments".

A job builds a `FlagParser`, adds its groups by name (`add_group`), and `parse(argv)` returns `Flags`: every
group parsed once into its typed dataclass, each field's check run (`--per_device_train_batch_size must be
positive, got 0.`). Nothing downstream sees the argparse namespace.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import UsageError

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


@dataclass(frozen=True)
class Check:
    """A range rule of one flag: `holds(value)`, else the error ends in `must <rule>, got <value>.`"""

    rule: str
    holds: Callable[[Any], bool]


POSITIVE = Check("be positive", lambda v: v > 0)
NON_NEGATIVE = Check("not be negative", lambda v: v >= 0)
FINITE_POSITIVE = Check("be a finite number > 0", lambda v: math.isfinite(v) and v > 0)
FINITE_NON_NEGATIVE = Check("be a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
PERCENTAGE = Check("lie in (0, 100]", lambda v: 0 < v <= 100)
UNIT_INTERVAL = Check("lie in [0, 1]", lambda v: 0 <= v <= 1)
OPEN_UNIT_INTERVAL = Check("lie in [0, 1)", lambda v: 0 <= v < 1)
FRACTION = Check("lie in (0, 1]", lambda v: 0 < v <= 1)


def arg(default=None, help: str = "", check: Check | None = None, **options):
    """A dataclass field that is also a flag: its default, help text, range check (run on a value that is not
    None) and argparse options (type, choices, action)."""
    return field(default=default, metadata={"help": help, "options": options, "check": check})


def switch(help: str):
    """A dataclass field that is an on/off flag (store_true), off by default."""
    return arg(False, help, action="store_true")


def from_flag(default=None, help: str = ""):
    """A field of a typed group that is not a flag of its own: the job fills it from a flag named elsewhere
    (e.g. the family's sequence-length flag, whose name differs by family)."""
    return field(default=default, metadata={"help": help, "flag": False})


def is_flag(item) -> bool:
    return item.metadata.get("flag", True)


@dataclass(frozen=True)
class Flags:
    """A command line parsed once: each typed group by name (`flags.model`, `flags.training`, ...) and every
    flag's value as given (what a run records beside its results)."""

    groups: dict[str, Any]
    values: dict[str, Any]

    def __getattr__(self, name: str):
        groups = self.__dict__.get("groups", {})
        if name in groups:
            return groups[name]
        raise AttributeError(f"No flag group {name!r}; this command line has {', '.join(groups)}.")

    def get(self, name: str):
        """The typed group `name`, or None when this job has no such group."""
        return self.groups.get(name)


class FlagParser(argparse.ArgumentParser):
    """An argparse parser whose flags come in typed groups; `parse` returns them as `Flags`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.typed_groups: dict[str, tuple[type, dict[str, str]]] = {}

    def parse(self, argv: list[str] | None) -> Flags:
        values = vars(parse_args(self, argv))
        groups = {name: typed_group(cls, values, sources) for name, (cls, sources) in self.typed_groups.items()}
        return Flags(groups, values)


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


def add_group(
    parser: FlagParser,
    name: str,
    group_class: type,
    title: str,
    changes: dict[str, dict] | None = None,
    after: dict[str, Callable[[argparse._ArgumentGroup], None]] | None = None,
    omit: tuple[str, ...] = (),
    sources: dict[str, str] | None = None,
) -> argparse._ArgumentGroup:
    """The flag fields of the dataclass `group_class` as the flags `--<field>` of one argument group, parsed
    into `flags.<name>`. `changes` adjusts a field's argparse options for this script (another default or help
    text); `after[field]` adds flags that are not the group's own (e.g. the family's sequence-length flag) right
    after that field; `omit` names fields this script does not take (they keep their defaults); `sources` maps a
    `from_flag` field to the flag that fills it."""
    parser.typed_groups[name] = (group_class, sources or {})
    group = parser.add_argument_group(title)
    for item in fields(group_class):
        if item.name in omit or not is_flag(item):
            continue
        options = {"default": item.default, "help": item.metadata["help"], **item.metadata["options"]}
        options |= (changes or {}).get(item.name, {})
        if options.get("action") == "store_true":
            options.pop("default")
        group.add_argument(f"--{item.name}", **options)
        if item.name in (after or {}):
            after[item.name](group)
    return group


def typed_group(group_class: type, values: dict, sources: dict[str, str] | None = None):
    """The typed group of parsed flag `values`, each field's range check run (one line naming the flag)."""
    sources = sources or {}
    parsed = {}
    for item in fields(group_class):
        flag = sources.get(item.name, item.name)
        value = values.get(flag, item.default)
        check = item.metadata.get("check")
        if check is not None and value is not None and not check.holds(value):
            raise UsageError(f"--{flag} must {check.rule}, got {value}.")
        parsed[item.name] = value
    return group_class(**parsed)
