"""Quantizers on tensor sums inside a module's forward (residual and embedding sums), exactly.

A residual sum such as OPT's `residual + attention_output` has no module boundary: it feeds a LayerNorm and
the next residual branch at once, so a hook on either consumer would quantize one use and not the other.
`SumQuantizers.attach(module)` runs the module's forward inside a `TorchFunctionMode` that sees its tensor
additions of width `hidden` (both operands and the result end in that dimension), in order. The i-th
addition's result is replaced by its quantized value, so every later use reads the quantized sum, and no
other op changes. Each forward must make exactly the declared number of such additions. An upstream
change that adds or removes one fails loudly instead of shifting the quantizers onto other tensors. The
quantizers' own arithmetic (per-channel range estimates, LLM.int8()'s two partial products) runs inside
`hidden_from_sums()` and is not counted.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_ADDITIONS = {torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add, torch.add}
_hidden = [0]  # depth of hidden_from_sums scopes


@contextmanager
def hidden_from_sums():
    """Additions made inside this scope are a quantizer's own, never a model's residual sum."""
    _hidden[0] += 1
    try:
        yield
    finally:
        _hidden[0] -= 1


class _QuantizeAdditions(TorchFunctionMode):
    # While a mode's handler runs, torch takes the mode off its stack: the quantizer ops below are not seen.
    def __init__(self, quantizers: nn.ModuleList, hidden: int):
        super().__init__()
        self.quantizers, self.hidden, self.seen = quantizers, hidden, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if (
            func not in _ADDITIONS
            or _hidden[0]
            or not all(
                isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[-1] == self.hidden for t in (*args[:2], result)
            )
        ):
            return result
        index, self.seen = self.seen, self.seen + 1
        return self.quantizers[index](result) if index < len(self.quantizers) else result


class SumQuantizers(nn.Module):
    """One quantizer per width-`hidden` tensor addition of a module's forward (nn.Identity leaves one FP)."""

    def __init__(self, quantizers: list[nn.Module], hidden: int):
        super().__init__()
        self.quantizers = nn.ModuleList(quantizers)
        self.hidden = hidden

    def attach(self, module: nn.Module) -> None:
        """Wrap `module.forward` (an instance attribute: the class and parameter names stay unchanged) and
        register these quantizers as `module.sum_quantizers`, so they are saved with the model state."""
        original = type(module).forward

        def forward(this, *args, **kwargs):
            owner = this.sum_quantizers  # looked up on the module, so a deep copy uses its own quantizers
            mode = _QuantizeAdditions(owner.quantizers, owner.hidden)
            with mode:
                output = original(this, *args, **kwargs)
            if mode.seen != len(owner.quantizers):
                raise RuntimeError(
                    f"{type(this).__name__}.forward made {mode.seen} additions of width {owner.hidden}, expected "
                    f"{len(owner.quantizers)}: the upstream forward changed, so the sum quantizers would sit on other "
                    "tensors. Update the quantization wiring for this transformers version."
                )
            return output

        module.forward = types.MethodType(forward, module)
        module.sum_quantizers = self
