"""DoRA: the part of ``LoRALinear`` that calls ``fastlora.dora.dora_linear`` with a cached
``||W||^2`` (``use_dora``; the op itself is in fastlora/dora.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dora import dora_linear
from ..quant import NF4Weight


class DoRAMagnitude:
    """Uses the layer's ``weight``, ``dense_weight`` (layers/quant_base.py) and ``_sqnorm_cache``."""

    def _weight_sqnorm(self, acc: torch.dtype) -> Tensor:
        """``||W_i||^2`` (N,) in ``acc``, cached while W is unchanged (tracked by storage and
        version). Under torch.compile it is recomputed in the graph (storage checks are not
        traceable)."""
        if torch.compiler.is_compiling():
            return self.dense_weight().detach().to(acc).square().sum(1)
        t = self.weight.packed if isinstance(self.weight, NF4Weight) else getattr(self.weight, "CB", self.weight)
        key = (t.data_ptr(), t._version, id(self.weight), acc)
        if self._sqnorm_cache is None or self._sqnorm_cache[0] != key:
            self._sqnorm_cache = (key, self.dense_weight().detach().to(acc).square().sum(1))
        return self._sqnorm_cache[1]

    def _dora_forward(self, x: Tensor, A: Tensor, B: Tensor, magnitude: Tensor, **kw) -> Tensor:
        acc = torch.float64 if A.dtype == torch.float64 else torch.float32
        return dora_linear(x, self.weight, A, B, magnitude, weight_sqnorm=self._weight_sqnorm(acc), **kw)
