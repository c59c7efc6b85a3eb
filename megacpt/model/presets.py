"""Model size presets: the Pythia family, Ibrahim et al.'s 10B, the Llama 3.x, Mistral and Qwen2.5 models
people continue today, and tiny sizes for CPU.

Pythia dims are from the Pythia paper's model table (FFN 4 x hidden, seq 2048, rotary 0.25, parallel
residual, untied embeddings). `vocab_size` is the GPT-NeoX-20B tokenizer's 50277; padding to a multiple of
128 x TP gives Pythia's 50304 at TP 1 and 50688 for the 10B at TP 6.

The Llama-style presets carry the published config.json values (their vocabularies are multiples of 128, so
nothing is padded at TP 1, and the parameter counts are the published ones); `seq_length` is the length of a
continued-pretraining sample, not the longest position the model supports: Llama 3.x 8192 (its pretraining
length), Mistral 7B v0.1 4096 (its sliding window), Qwen2.5 4096 (its pretraining length before the long-context
stage).
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


def _llama(family: str, num_layers: int, hidden_size: int, num_attention_heads: int, num_query_groups: int,
           ffn_hidden_size: int, vocab_size: int, seq_length: int, *, theta: int, tie: bool = False, eps: float = 1e-5,
           scaling: float | None = None, sliding_window: int | None = None) -> dict:
    preset = {"family": family, "num_layers": num_layers, "hidden_size": hidden_size,
              "num_attention_heads": num_attention_heads, "num_query_groups": num_query_groups,
              "ffn_hidden_size": ffn_hidden_size, "seq_length": seq_length, "vocab_size": vocab_size,
              "tie_embeddings": tie, "rotary_base": theta, "layernorm_eps": eps}
    if scaling is not None:
        preset["rope_scaling"] = {"rope_type": "llama3", "factor": scaling}
    if sliding_window is not None:
        preset["sliding_window"] = sliding_window
    return preset


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
    # Llama 3.x (rope_theta 500,000 with Llama 3.1's frequency scaling), Mistral 7B v0.1, Qwen2.5 (q/k/v biases).
    "llama-3.2-1b": _llama("llama", 16, 2048, 32, 8, 8192, 128256, 8192, tie=True, theta=500000, scaling=32.0),
    "llama-3.1-8b": _llama("llama", 32, 4096, 32, 8, 14336, 128256, 8192, theta=500000, scaling=8.0),
    "llama-3.1-70b": _llama("llama", 80, 8192, 64, 8, 28672, 128256, 8192, theta=500000, scaling=8.0),
    "mistral-7b": _llama("mistral", 32, 4096, 32, 8, 14336, 32000, 4096, theta=10000, sliding_window=4096),
    "qwen2.5-0.5b": _llama("qwen2", 24, 896, 14, 2, 4864, 151936, 4096, tie=True, theta=1000000, eps=1e-6),
    "qwen2.5-7b": _llama("qwen2", 28, 3584, 28, 4, 18944, 152064, 4096, theta=1000000, eps=1e-6),
    # CPU sizes for tests, the demo and quick trials (vocab to be set from the tokenizer).
    "tiny": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256, "seq_length": 64,
             "vocab_size": 256},
    "cpu-small": {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 8, "ffn_hidden_size": 1024,
                  "seq_length": 256, "vocab_size": 4096},
    "cpu-25m": {"num_layers": 6, "hidden_size": 512, "num_attention_heads": 8, "ffn_hidden_size": 2048,
                "seq_length": 512, "vocab_size": 8192},
}
