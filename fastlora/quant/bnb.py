"""``NF4Weight`` views of a bitsandbytes ``Linear4bit``'s own bytes (no copy), for the PEFT patch.
bitsandbytes itself is never imported here: the view reads the layer's tensors and quant state."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .nf4_weight import NF4Weight

# bitsandbytes Linear4bit -> (weakref to its QuantState, identity key, NF4Weight view). Keyed
# weakly on the module, so the cache neither changes the model (state dict, deepcopy, pickling)
# nor keeps it alive. The NF4Weight shares bitsandbytes' tensors: no byte is copied.
_nf4_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def nf4_view(base: nn.Module) -> NF4Weight:
    """An :class:`NF4Weight` over a bitsandbytes ``Linear4bit``'s own packed bytes and quant
    state (no copy), cached per layer while the same tensors back it: a new weight, quant state
    or statistics tensor (re-quantization, ``.to()``, merge, ...) builds a new view."""
    weight = base.weight
    qs = weight.quant_state
    data = weight.data
    st2 = qs.state2 if qs.nested else None
    tensors = (qs.absmax, qs.code) + ((qs.offset, st2.absmax, st2.code) if st2 is not None else ())
    key = (data.data_ptr(), data.dtype, tuple(data.shape), tuple(qs.shape), qs.dtype, qs.blocksize)
    key += (st2.blocksize,) if st2 is not None else ()
    hit = _nf4_cache.get(base)
    # Statistics tensors are compared by identity. The packed bytes are compared by address,
    # which no other tensor can take while the cached view keeps that storage alive.
    if hit is not None and hit[0]() is qs and hit[1] == key and len(hit[2]) == len(tensors):
        if all(a is b for a, b in zip(hit[2], tensors, strict=True)):
            return hit[3]
    packed = (data if data.dtype == torch.uint8 else data.view(torch.uint8)).view(-1, 1)
    nested = {}
    if st2 is not None:
        nested = dict(offset=qs.offset, nested_absmax=st2.absmax, nested_code=st2.code, nested_blocksize=st2.blocksize)
    view = NF4Weight(packed, qs.absmax, qs.shape, qs.dtype, qs.blocksize, code=qs.code, **nested)
    _nf4_cache[base] = (weakref.ref(qs), key, tensors, view)
    return view
