"""Per-embedding-group (PEG) activation quantization: the d channels of the last dimension cut into K groups,
each with its own static range (Bondarenko et al., EMNLP 2021).

Each group has its own range estimator (any of the registry's) that observes only its channels, so a group's
range is exactly what that estimator makes of the group's values. The groups are contiguous runs of a channel
order: the natural one, or with range-based permutation the channels sorted by their calibrated range
(high - low, from the same estimator run per channel), so the few outlier channels share the last group. The
order needs its own calibration pass before the groups can observe (`needs_channel_order`; calibration.py
runs it). Groups differ in size by at most one channel when K does not divide d. Once frozen the group ranges
are expanded to one scale and zero point per channel, so quantizing is per-channel fake quantization along
the last axis: K = 1 is per-tensor and K = d per-channel, bit for bit, and the permutation costs nothing at
run time.
"""

from __future__ import annotations

import torch
from torch import nn

from .affine import scale_and_zero_point
from .estimators import build_estimator
from .quantizer import Quantizer, fake_quantize
from .sums import hidden_from_sums


class GroupQuantizer(Quantizer):
    def __init__(
        self,
        n_bits: int = 8,
        symmetric: bool = False,
        estimator: str = "running_minmax",
        groups: int = 6,
        permute: bool = False,
        in_place: bool = False,
        **estimator_options,
    ):
        if groups < 1:
            raise ValueError(f"A per-embedding-group quantizer needs at least 1 group, got {groups}.")
        super().__init__(n_bits, symmetric, estimator, axis=-1, in_place=in_place, **estimator_options)
        self.groups, self.permute = groups, permute
        # The base class's estimator (per channel: axis -1) calibrates the channel order; each group has its own.
        self.group_estimators = nn.ModuleList(
            build_estimator(estimator, self.n_bits, symmetric, None, **estimator_options) for _ in range(groups)
        )
        self.register_buffer("permutation", torch.empty(0, dtype=torch.int64))
        self._members: list[torch.Tensor] | None = None

    @property
    def needs_channel_order(self) -> bool:
        """Whether the range-based permutation still has to be calibrated (before the groups observe)."""
        return self.permute and self.permutation.numel() == 0

    def set_mode(self, mode: str) -> None:
        if mode == "order":  # calibration pass 1: observe per-channel ranges, pass values through
            self.mode = mode
            return
        super().set_mode(mode)

    @torch.no_grad()
    def freeze_channel_order(self) -> None:
        """Sort the channels by the calibrated width of their range; the groups are contiguous runs of it."""
        low, high = self.estimator.range()
        self.permutation = torch.argsort(high - low, stable=True)
        self._members = None

    def members(self) -> list[torch.Tensor]:
        """The channel indices of each group."""
        if self._members is None:
            self._members = list(torch.tensor_split(self.permutation, self.groups))
        return self._members

    def _check_channels(self, x: torch.Tensor) -> None:
        channels = x.shape[-1]
        if self.groups > channels:
            raise ValueError(f"{self.groups} embedding groups exceed the {channels} channels of this tensor.")
        if self.permutation.numel() == 0:  # no range-based order: the natural one
            self.permutation = torch.arange(channels, device=x.device)
            self._members = None
        elif self.permutation.numel() != channels:
            raise ValueError(f"This quantizer grouped {self.permutation.numel()} channels, got {channels}.")

    def calibrated_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each channel's (low, high): the range of its group."""
        group_of = torch.empty_like(self.permutation)
        for index, members in enumerate(self.members()):
            group_of[members] = index
        lows, highs = zip(*(estimator.range() for estimator in self.group_estimators), strict=True)
        return torch.stack(lows)[group_of], torch.stack(highs)[group_of]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "order":
            with hidden_from_sums():
                self.estimator.observe(self.observed(x))
            return x
        if self.mode != "observe":
            return super().forward(x)
        self._check_channels(x)
        values = self.observed(x)
        with hidden_from_sums():
            for estimator, members in zip(self.group_estimators, self.members(), strict=True):
                estimator.observe(values.index_select(-1, members))
        if not self.quantize_while_observing:
            return x
        scale, zero_point, q_min, q_max = scale_and_zero_point(*self.calibrated_range(), self.n_bits, self.symmetric)
        return fake_quantize(x, scale, zero_point, q_min, q_max, -1)

    def _after_load(self) -> None:
        self._members = None
        super()._after_load()

    def extra_repr(self) -> str:
        order = "permuted" if self.permute else "contiguous"
        return f"{super().extra_repr()}, {self.groups} embedding groups ({order})"
