"""DyLoRA: the part of ``LoRALinear`` that picks the runtime rank b in [1, r] (``dynamic_rank``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .adapter_state import AdapterConfig, _scale


class DyLoRARank:
    """``runtime_rank`` and the rank and scale a forward uses. Uses the layer's ``_active``,
    ``dynamic_rank``, ``active_rank`` and ``training``."""

    def runtime_rank(self) -> int:
        """The rank this forward uses: ``r``, or for DyLoRA ``active_rank`` when set, else a
        uniform sample from [1, r] in training (torch's RNG, so checkpoint recomputation and
        ``torch.manual_seed`` reproduce it) and ``r`` in eval."""
        rec = self._active
        if rec is None:
            raise ValueError("no active adapter on this layer")
        return self._rank(rec.cfg.r)

    def _rank(self, r: int) -> int:
        if not self.dynamic_rank:
            return r
        if self.active_rank is not None:
            if not 1 <= self.active_rank <= r:
                raise ValueError(f"active_rank must be in [1, {r}], got {self.active_rank}")
            return self.active_rank
        return int(torch.randint(1, r + 1, ()).item()) if self.training else r

    def scale_for(self, b: int) -> float:
        return _scale(self._active.cfg, b)

    def _rank_and_scale(self, cfg: AdapterConfig, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, float]:
        """The adapter a forward computes with at this step's rank b: ``(A[:b], B[:, :b], scale)``."""
        if self.dynamic_rank and self.active_rank is None and self.training and torch.compiler.is_compiling():
            # DyLoRA traced: b is drawn as a tensor and B's columns past b are zeroed with the
            # scale folded in (no data-dependent shape, no graph break); equal to the slices below
            b = torch.randint(1, cfg.r + 1, (), device=B.device)
            s = cfg.lora_alpha / (b.double().sqrt() if cfg.use_rslora else b.double())
            cols = torch.arange(cfg.r, device=B.device) < b
            return A, B * torch.where(cols, s, 0.0).to(B.dtype), 1.0
        b = self._rank(cfg.r)
        # DyLoRA slices are views: A[:b] is contiguous, B[:, :b] strided; no copies
        if b != cfg.r:
            A, B = A[:b], B[:, :b]
        return A, B, _scale(cfg, b)
