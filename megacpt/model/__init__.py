"""The GPT-NeoX model on megatron-core: presets, layer spec, builder, CPU fallback, HF weight mapping."""
