"""megacpt: continual pretraining of GPT-NeoX models (megatron-core model in a DeepSpeed engine)."""

__version__ = "0.1.0"
