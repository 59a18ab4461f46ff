"""Quantized bases: the part of ``LoRALinear`` whose ``weight`` may be a ``fastlora.quant``
object (NF4 or int8) instead of a Parameter: dequantizing, requantizing, bitsandbytes' state-dict
keys and device moves."""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import QUANTIZED
from ..quant import Int8Weight, NF4Weight, quantize


class QuantizedBase:
    """Uses the layer's ``weight``, ``quant``, ``blocksize``, ``double_quant``, ``in_features``,
    ``out_features`` and clears DoRA's ``_sqnorm_cache`` when a loaded base replaces the weight."""

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.weight, QUANTIZED)

    def _quantize_base(self, weight: Tensor) -> None:
        """Replace the Parameter ``weight`` by ``weight`` quantized as the layer's ``quant`` asks."""
        del self.weight
        self.weight = quantize(weight.detach(), self.quant, self.blocksize, self.double_quant)

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The base weight as a dense (out, in) tensor (a transient dequantized copy if quantized)."""
        if self.is_quantized:
            return self.weight.dequantize(dtype or self._adapter_dtype())
        return self.weight if dtype is None else self.weight.to(dtype)

    @torch.no_grad()
    def _set_base(self, w: Tensor) -> None:
        """Write a new dense base (fp32/fp64) back: in place, or requantized (lossy, as PEFT+bnb)."""
        if self.is_quantized:
            self.weight = quantize(w.to(self.weight.dtype), self.quant, self.blocksize, self.double_quant)
        else:
            self.weight.copy_(w.to(self.weight.dtype))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_quantized:  # bitsandbytes' keys and bytes for the base weight
            destination.update(self.weight.state_dict_entries(prefix))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self.is_quantized:
            # bitsandbytes' keys: Linear4bit's weight and weight.*, Linear8bitLt's weight, SCB, weight_format
            extra = (prefix + "SCB", prefix + "weight_format") if isinstance(self.weight, Int8Weight) else ()
            own = {
                k: v
                for k, v in state_dict.items()
                if k == prefix + "weight" or k.startswith(prefix + "weight.") or k in extra
            }
            if own:
                # validated by from_state_dict; a damaged entry raises before anything changes
                if isinstance(self.weight, Int8Weight):
                    q = Int8Weight.from_state_dict(own, prefix, dtype=self.weight.dtype)
                else:
                    q = NF4Weight.from_state_dict(own, prefix)
                if tuple(q.shape) != (self.out_features, self.in_features):
                    raise ValueError(
                        f"{prefix}weight: shape {tuple(q.shape)} != ({self.out_features}, {self.in_features})"
                    )
                self.weight = q.to(self.weight.device)
                self._sqnorm_cache = None
            elif strict:
                missing_keys.append(prefix + "weight")
            state_dict = {k: v for k, v in state_dict.items() if k not in own}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _quant_follow(self, fn) -> None:
        """After ``Module._apply(fn)``: a quantized base follows device moves (its packed format
        never changes dtype)."""
        if self.is_quantized:
            device = fn(torch.empty(0, device=self.weight.device)).device
            if device != self.weight.device:
                self.weight = self.weight.to(device)
