"""fastlora: fused LoRA forward and backward kernels for PyTorch.

``y = x W^T + bias + scale * B(A(dropout(x)))`` in one pass, with the dropout mask regenerated
from a seed instead of stored. Import never touches a GPU and never fails for a missing
optional piece (triton, the C++ extension): the ``torch`` backend always works.
"""

from .adapters import (
    active_adapter,
    add_adapter,
    delete_adapter,
    list_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
)
from .backends import preload as _preload
from .backends.plans import plan_table
from .functional import (
    available_backends,
    dropout_mask,
    get_backend,
    get_quant_route,
    lora_linear,
    set_backend,
    set_quant_route,
)
from .nn import LoRALinear, inject, lora_layers, merge, print_trainable_parameters, unmerge
from .peft import patch_peft, unpatch_peft
from .quant import Int8Weight, NF4Weight, quantize
from .variants import LoRAFAOptimizer, dora_linear, lorafa_project_grads_, loraplus_param_groups

_preload()  # register the Triton ops outside any torch.compile trace (where CUDA can be used)

__version__ = "0.1.0"

__all__ = [
    "active_adapter",
    "add_adapter",
    "delete_adapter",
    "list_adapters",
    "load_adapter",
    "save_adapter",
    "set_adapter",
    "Int8Weight",
    "NF4Weight",
    "quantize",
    "LoRAFAOptimizer",
    "LoRALinear",
    "dora_linear",
    "loraplus_param_groups",
    "lorafa_project_grads_",
    "available_backends",
    "dropout_mask",
    "get_backend",
    "get_quant_route",
    "inject",
    "lora_layers",
    "lora_linear",
    "merge",
    "patch_peft",
    "plan_table",
    "print_trainable_parameters",
    "set_backend",
    "set_quant_route",
    "unmerge",
    "unpatch_peft",
]
