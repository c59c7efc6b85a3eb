"""Model size presets: the Pythia family, Ibrahim et al.'s 10B, and tiny sizes for CPU.

Pythia dims are from the Pythia paper's model table (FFN 4 x hidden, seq 2048, rotary 0.25, parallel
residual, untied embeddings). `vocab_size` is the GPT-NeoX-20B tokenizer's 50277; padding to a multiple of
128 x TP gives Pythia's 50304 at TP 1 and 50688 for the 10B at TP 6.
"""

NEOX_VOCAB = 50277


def _neox(num_layers: int, hidden_size: int, num_attention_heads: int, seq_length: int = 2048) -> dict:
    return {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "ffn_hidden_size": 4 * hidden_size,
        "seq_length": seq_length,
        "vocab_size": NEOX_VOCAB,
    }


PRESETS: dict[str, dict] = {
    "pythia-14m": _neox(6, 128, 4),
    "pythia-31m": _neox(6, 256, 8),
    "pythia-70m": _neox(6, 512, 8),
    "pythia-160m": _neox(12, 768, 12),
    "pythia-410m": _neox(24, 1024, 16),
    "pythia-1b": _neox(16, 2048, 8),
    "pythia-1.4b": _neox(24, 2048, 16),
    "pythia-2.8b": _neox(32, 2560, 32),
    "pythia-6.9b": _neox(32, 4096, 32),
    "pythia-12b": _neox(36, 5120, 40),
    # Ibrahim et al. 2024's GPT-NeoX models (same architecture, their own sizes).
    "neox-405m": _neox(24, 1024, 16),
    "neox-10b": _neox(36, 4608, 36),
    # CPU sizes for tests, the demo and quick trials (vocab to be set from the tokenizer).
    "tiny": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256, "seq_length": 64,
             "vocab_size": 256},
    "cpu-small": {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "ffn_hidden_size": 1024,
                  "seq_length": 256, "vocab_size": 4096},
    "cpu-25m": {"num_layers": 6, "hidden_size": 512, "num_attention_heads": 8, "ffn_hidden_size": 2048,
                "seq_length": 512, "vocab_size": 8192},
}
