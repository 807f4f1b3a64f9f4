"""Typed settings of the attention variant, and the one place where the paper's flags become them.

`AttentionConfig` is stored in the HF model config under `attention_variant`, so `config.json` carries the
method and a checkpoint reloads as the same model without repeating flags. A config without that key (a
stock HF checkpoint) is vanilla attention.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, make_dataclass

from transformers import PretrainedConfig

from ..arguments import FlagParser, add_group, arg
from ..errors import UsageError
from .gates import GATE_NETWORKS, GATE_TYPES, logit  # noqa: F401 (logit: part of this module's API)
from .softmax import CLIPPABLE, SOFTMAX_FORMS, SOFTMAX_VARIANTS, SoftmaxSpec, softmax_variant

CONFIG_KEY = "attention_variant"
DEFAULT_GATE_NETWORK = "linear"  # the network without a flag


def reads_train_seq_length(spec: SoftmaxSpec, alpha: float | None) -> bool:
    """Whether the method is fixed by T_train when the model is built (the alpha form, sigmoid attention)."""
    return alpha is not None or SOFTMAX_VARIANTS[spec.normaliser].needs_seq_length


@dataclass(frozen=True)
class AttentionConfig:
    """The attention variant of every self-attention layer of a model (defaults = vanilla attention)."""

    softmax: str = "vanilla"
    """The normaliser (softmax.py): 'vanilla', 'softmax1', 'sink', 'softpick', 'sigmoid', 'clipped(GAMMA:ZETA)',
    'clipped_softmax1(GAMMA:ZETA)', 'clipped_sink(GAMMA:ZETA)'."""
    alpha: float | None = None
    """Alpha form of clipped softmax: gamma = -alpha / train_seq_length, zeta = 1 (clips the unclipped
    normaliser `softmax` names)."""
    train_seq_length: int | None = None
    """T_train of the alpha form and of sigmoid attention, fixed when the model is built (BERT max_seq_length,
    OPT block_size)."""
    bias_kv: bool = False
    """Explicit attention bias (Sun et al. 2024): a learned key and value per head, prepended to every
    sequence's keys and values."""
    gate_type: str = "none"
    gate_network: str = DEFAULT_GATE_NETWORK
    init_prob: float = 0.5
    """Initial gate probability: the final gate bias starts at logit(init_prob)."""
    fine_tuning: bool = False
    """Gate weights start at N(0, 0.01) and the gate output is scaled by 1 / init_prob."""
    skip_attn: bool = False
    """Ablation: the attention function returns a zero context (no token mixing)."""

    def __post_init__(self):
        spec = softmax_variant(self.softmax)  # validates the method string, parsed once here
        object.__setattr__(self, "_spec", spec)
        if self.alpha is not None:
            if spec.clip is not None or not SOFTMAX_VARIANTS[spec.normaliser].clippable:
                raise UsageError(
                    f"alpha={self.alpha} (--alpha) clips the normaliser softmax={self.softmax!r} (--attn_softmax) "
                    f"names, which must be an unclipped clippable one ({', '.join(CLIPPABLE)})."
                )
            if not (math.isfinite(self.alpha) and self.alpha >= 0):
                raise UsageError(f"alpha must be a finite number >= 0 (gamma = -alpha / T), got {self.alpha}.")
        if self.needs_seq_length and (self.train_seq_length is None or self.train_seq_length <= 0):
            raise UsageError(
                f"{'The alpha form of clipped softmax' if self.alpha is not None else self.softmax} needs the "
                "training sequence length (train_seq_length = --max_seq_length for BERT, --block_size for OPT)."
            )
        if self.gate_type not in GATE_TYPES:
            raise UsageError(f"Unknown gate type {self.gate_type!r}; valid gate types: {', '.join(GATE_TYPES)}.")
        if self.gate_network not in GATE_NETWORKS:
            raise UsageError(
                f"Unknown gate network {self.gate_network!r}; valid gate networks: {', '.join(GATE_NETWORKS)}."
            )
        if not 0.0 < self.init_prob < 1.0:
            raise UsageError(f"init_prob must lie strictly between 0 and 1, got {self.init_prob}.")
        kind = GATE_TYPES[self.gate_type]
        if self.gate_network != DEFAULT_GATE_NETWORK and not (kind is not None and kind.chooses_network):
            raise UsageError(
                f"gate_network={self.gate_network!r} needs a conditional gate type that takes a network "
                f"(conditional_per_head or conditional_per_token), got gate_type={self.gate_type!r}."
            )
        if (kind is None or not kind.init_from_prob) and (self.fine_tuning or self.init_prob != 0.5):
            raise UsageError(
                f"fine_tuning and init_prob set the paper's gate initialisation, which gate_type={self.gate_type!r} "
                "does not use; choose conditional_per_token (or another paper gate type) or drop them."
            )
        if self.skip_attn and (self.gated or not self.plain_softmax or self.bias_kv):
            raise UsageError(
                "skip_attn (--skip_attn) removes the attention output: it cannot be combined with a gate, "
                "an attention bias or a softmax variant."
            )

    @property
    def spec(self) -> SoftmaxSpec:
        """The normaliser and clip `softmax` names (parsed when the settings are made)."""
        return self._spec

    @property
    def gamma(self) -> float:
        if self.alpha is not None:
            return -self.alpha / self.train_seq_length
        return (self.spec.clip or (0.0, 1.0))[0]

    @property
    def zeta(self) -> float:
        return (self.spec.clip or (0.0, 1.0))[1]

    @property
    def normaliser(self) -> str:
        """The registered normaliser (softmax.py) this method runs, clipped or not."""
        return self.spec.normaliser

    @property
    def clipped(self) -> bool:
        """True when the normaliser is clipped (even clipped(0:1), which computes the same as vanilla)."""
        return self.alpha is not None or self.spec.clip is not None

    @property
    def needs_seq_length(self) -> bool:
        return reads_train_seq_length(self.spec, self.alpha)

    @property
    def plain_softmax(self) -> bool:
        """Unclipped softmax: rows of weights that sum to 1 over the keys."""
        return self.normaliser == "vanilla" and not self.clipped

    @property
    def gated(self) -> bool:
        return self.gate_type != "none"

    @property
    def gate_scale(self) -> float:
        """Factor on the gate output: 1 / init_prob in fine-tuning mode, so a new gate starts as identity."""
        return 1.0 / self.init_prob if self.fine_tuning else 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> AttentionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"Unknown attention settings {unknown}; valid keys: {sorted(known)}.")
        return cls(**values)

    @classmethod
    def from_model_config(cls, config: PretrainedConfig) -> AttentionConfig:
        values = getattr(config, CONFIG_KEY, None)
        if values is None:
            return cls()
        if isinstance(values, AttentionConfig):
            return values
        return cls.from_dict(dict(values))

    def apply_to(self, config: PretrainedConfig) -> PretrainedConfig:
        """Store these settings in a HF model config (in place) and return it."""
        setattr(config, CONFIG_KEY, self.to_dict())
        return config


def _attention_fields() -> list[tuple]:
    """The attention flags in order; one switch per gate network that has one, read from the registry.
    Defaults None (meaning vanilla / no gate), so a flag given explicitly can be told from one left out."""
    switches = [
        (network.flag.removeprefix("--"), bool, arg(False, network.flag_help, action="store_true"))
        for network in GATE_NETWORKS.values()
        if network.flag
    ]
    return [
        ("attn_softmax", str | None, arg(None, f"Softmax (default vanilla): {SOFTMAX_FORMS}.")),
        (
            "alpha",
            float | None,
            arg(
                None,
                "Clipped softmax in the alpha form: gamma = -alpha / T_train, zeta = 1 (T_train: sequence length).",
                type=float,
            ),
        ),
        ("attn_gate_type", str | None, arg(None, "Gated attention type (default none).", choices=list(GATE_TYPES))),
        (
            "attn_gate_init",
            float | None,
            arg(
                None,
                "Initial gate probability init_prob (default 0.5): the gate bias starts at logit(init_prob).",
                type=float,
            ),
        ),
        *switches,
        (
            "fine_tuning",
            bool,
            arg(
                False,
                "Add gates to a pretrained model: gate weights N(0, 0.01), gate output scaled by 1 / init_prob.",
                action="store_true",
            ),
        ),
        (
            "attn_bias_kv",
            bool,
            arg(False, "Explicit attention bias: a learned key and value per head (Sun et al.).", action="store_true"),
        ),
        ("skip_attn", bool, arg(False, "Ablation: attention returns a zero context.", action="store_true")),
    ]


# The paper's attention flags as a typed group (its gate-network switches come from the registry).
AttentionArgs = make_dataclass("AttentionArgs", _attention_fields(), frozen=True)


def add_attention_args(parser: FlagParser) -> FlagParser:
    """The paper's attention flags, shared by the training and validation scripts."""
    add_group(parser, "attention", AttentionArgs, "attention variant")
    return parser


def gate_network_switches(flags: AttentionArgs) -> list[tuple[str, str, bool]]:
    """(flag, gate network, given) for each gate network's switch."""
    return [
        (network.flag, name, getattr(flags, network.flag.removeprefix("--")))
        for name, network in GATE_NETWORKS.items()
        if network.flag
    ]


def attention_config_from_args(flags: AttentionArgs, train_seq_length: int | None) -> AttentionConfig:
    """Turn the parsed attention flags into an `AttentionConfig`, rejecting contradictions with one clear error
    that names the flags.

    Only what the flags alone can contradict is checked here; value ranges and combinations of settings are
    checked once, by `AttentionConfig`."""
    network_flags = {flag: (name, on) for flag, name, on in gate_network_switches(flags)}
    chosen = [flag for flag, (_, on) in network_flags.items() if on]
    if len(chosen) > 1:
        raise UsageError(f"Choose one gate network, got {' and '.join(chosen)}.")
    given = (("--attn_gate_init", flags.attn_gate_init is not None), ("--fine_tuning", flags.fine_tuning))
    gated_flags = chosen + [flag for flag, on in given if on]
    gate_type = flags.attn_gate_type or "none"
    if gate_type == "none" and gated_flags:
        raise UsageError(
            f"{', '.join(gated_flags)} configure the attention gate, but --attn_gate_type is 'none'; "
            "add --attn_gate_type conditional_per_token (the paper's choice) or drop them."
        )
    kind = GATE_TYPES.get(gate_type)
    if chosen and kind is not None and not kind.chooses_network:
        raise UsageError(
            f"{chosen[0]} sets a gate network, but --attn_gate_type {gate_type} has {kind.describe()}; "
            "use conditional_per_token or conditional_per_head, or drop the flag."
        )
    softmax = flags.attn_softmax or "vanilla"
    return AttentionConfig(
        softmax=softmax,
        alpha=flags.alpha,
        train_seq_length=train_seq_length if reads_train_seq_length(softmax_variant(softmax), flags.alpha) else None,
        bias_kv=flags.attn_bias_kv,
        gate_type=gate_type,
        gate_network=network_flags[chosen[0]][0] if chosen else DEFAULT_GATE_NETWORK,
        init_prob=0.5 if flags.attn_gate_init is None else flags.attn_gate_init,
        fine_tuning=flags.fine_tuning,
        skip_attn=flags.skip_attn,
    )
