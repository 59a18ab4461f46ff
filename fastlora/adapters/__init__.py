"""Named adapters over a model (add, list, hot-swap, delete) and adapter files in PEFT's format.

Files: a directory with ``adapter_config.json`` (a PEFT ``LoraConfig``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight`` (r, in),
``.lora_B.weight`` (out, r) and, for DoRA, ``.lora_magnitude_vector`` (out,): what PEFT's
``save_pretrained`` writes, so ``PeftModel.from_pretrained`` loads fastlora's files and
:func:`load_adapter` loads PEFT's. Loading never unpickles (``adapter_model.bin`` is refused), and
it checks everything (config, keys, shapes, dtypes, finite values) and builds every new tensor and
layer before it changes the model: a refused file leaves the model as it was.

Which adapter is active: ``set_adapter(model, name)`` activates ``name`` on every layer that has it
and leaves the others with no active adapter (their base linear only), as PEFT does. A new adapter
(``add_adapter``, ``load_adapter``) becomes active only when the model had no active adapter;
otherwise it is added inactive, as PEFT's ``add_adapter`` / ``load_adapter``.


The package: model.py (named adapters over a model), files.py (save / load), format.py (the file
format and its config), patterns.py (rank_pattern / alpha_pattern keys matched in linear time).
"""

from .files import load_adapter, save_adapter
from .format import CONFIG_NAME, KEY_PREFIX, PICKLE_NAME, WEIGHTS_NAME
from .model import active_adapter, add_adapter, delete_adapter, list_adapters, set_adapter
from .patterns import _SafePattern  # noqa: F401  (tests reach it here, where it lived)

__all__ = [
    "CONFIG_NAME",
    "KEY_PREFIX",
    "PICKLE_NAME",
    "WEIGHTS_NAME",
    "active_adapter",
    "add_adapter",
    "delete_adapter",
    "list_adapters",
    "load_adapter",
    "save_adapter",
    "set_adapter",
]
