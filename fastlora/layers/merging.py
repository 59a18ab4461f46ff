"""Merging: the part of ``LoRALinear`` that folds the active adapter into the base weight and
takes it out again (``merge(keep_base=...)`` / ``unmerge``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import QUANTIZED
from .adapter_state import _Adapter, _scale


def _delta(rec: _Adapter, b: int) -> Tensor:
    """``scale * B[:, :b] @ A[:b]`` (out, in) in float32 (float64 for fp64 A)."""
    acc = torch.float64 if rec.lora_A.dtype == torch.float64 else torch.float32
    return (rec.lora_B[:, :b].to(acc) @ rec.lora_A[:b].to(acc)).mul_(_scale(rec.cfg, b))


class Merging:
    """``merge`` / ``unmerge`` / ``delta_weight``. Uses the layer's ``_active`` record, ``merged``,
    ``_merge_info`` (while merged: the rank merged, DoRA's row norm or None, the pre-merge base
    kept or None), ``dynamic_rank`` / ``active_rank`` and ``dense_weight`` / ``_set_base``
    (layers/quant_base.py)."""

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` (out, in) at the runtime rank, in float32 (float64 for fp64 A)."""
        rec = self._active
        b = rec.cfg.r if not self.dynamic_rank or self.active_rank is None else self.active_rank
        return _delta(rec, b)

    @torch.no_grad()
    def merge(self, keep_base: bool = True) -> None:
        """Fold the adapter into ``weight`` so that forward is a plain linear (inference).
        DoRA: ``W <- (m / ||W + dW||_row) * (W + dW)``, as PEFT. A quantized base is requantized,
        which rounds (as PEFT does with bitsandbytes).

        ``keep_base``: where the merge is lossy in a way that repeated merge/unmerge would
        accumulate, keep the pre-merge base so that :meth:`unmerge` restores it exactly: the
        quantized object for NF4 / int8 bases (its packed bytes, no copy) and a copy of W for DoRA
        on a dense base. A plain dense base keeps nothing: unmerge subtracts the same delta (at
        the rank merged), off by at most one rounding of W's dtype, which does not grow with
        repetition. ``keep_base=False`` keeps nothing for any base (unmerge recomputes: DoRA and
        quantized bases then drift with every cycle)."""
        rec = self._active
        if self.merged or rec is None:
            return
        b = rec.cfg.r if not self.dynamic_rank or self.active_rank is None else self.active_rank
        d = _delta(rec, b)
        kept = None
        if keep_base and self.is_quantized:
            kept = self.weight  # _set_base replaces the object, so this one stays unchanged
        elif keep_base and rec.cfg.use_dora:
            kept = self.weight.detach().clone()
        w = self.dense_weight(d.dtype) + d
        norm = None
        if rec.cfg.use_dora:
            norm = torch.linalg.norm(w, dim=1)
            w = w * (rec.lora_magnitude_vector.to(d.dtype) / norm).unsqueeze(1)
        self._set_base(w)
        self._merge_info = (b, norm, kept)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: exactly where merge kept the base (see there), else by subtracting
        the delta merged (at the rank merged, for DyLoRA), up to the rounding of W's dtype or a
        requantization."""
        if not self.merged:
            return
        b, norm, kept = self._merge_info
        rec = self._active
        if kept is not None:
            if self.is_quantized:
                self.weight = kept
            else:
                self.weight.copy_(kept)
        else:
            d = _delta(rec, b)
            w = self.dense_weight(d.dtype)
            if norm is not None:
                w = w / (rec.lora_magnitude_vector.to(d.dtype) / norm).unsqueeze(1)
            self._set_base(w - d)
        self._merge_info = None
        self.merged = False

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self.merged and prefix + "weight" in state_dict and self._merge_info[2] is not None:
            # a loaded base replaces the merged one: unmerge can no longer restore the kept base
            self._merge_info = (*self._merge_info[:2], None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _merge_follow(self, fn) -> None:
        """After ``Module._apply(fn)``: the base kept for ``unmerge`` follows the layer (a dense
        one through ``fn``, a quantized one to ``fn``'s device)."""
        if self._merge_info is None:
            return
        b, norm, kept = self._merge_info
        if isinstance(kept, Tensor):  # DoRA's kept dense base follows the weight
            with torch.no_grad():
                self._merge_info = (b, None if norm is None else fn(norm), fn(kept))
        elif isinstance(kept, QUANTIZED):
            device = fn(torch.empty(0, device=kept.device)).device
            self._merge_info = (b, None if norm is None else norm.to(device), kept.to(device))
