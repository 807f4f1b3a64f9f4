"""Modules whose calibrated buffers start empty and take their saved shape when a state dict is loaded.

Ranges are unknown until calibration (and per-channel ones have the channel count only then), so
quantizers and estimators register empty placeholders; loading a calibrated state resizes them first.
"""

from __future__ import annotations

import torch
from torch import nn


class CalibratedState(nn.Module):
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buffer in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if buffer is not None and saved is not None and saved.shape != buffer.shape:
                self._buffers[name] = torch.empty_like(saved, device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._after_load()

    def _after_load(self) -> None:
        """Host-side state derived from the loaded buffers."""
