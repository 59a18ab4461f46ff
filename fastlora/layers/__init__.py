"""The parts ``fastlora.nn.LoRALinear`` is built from, one concern per module:

- adapter_state.py: the adapter settings record and named adapters (add / set / delete);
- merging.py: merge / unmerge (``keep_base``);
- quant_base.py: NF4 / int8 bases (dequantize, requantize, bitsandbytes' state-dict keys);
- dylora.py: the runtime rank; dora.py: DoRA's call into ``fastlora.dora``.

Each part is a mixin of methods over the layer's attributes (named in its docstring); the layer
keeps one set of attributes so that its state-dict keys and parameters stay those of PEFT's layer.
Data flows one way: layer -> ``fastlora.functional`` / ``fastlora.dora`` -> autograd -> backends.
"""
