"""benchmarks/gpu.py at its tiny CPU size: the command a GPU session will run, on the same code path."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def neox_flops(layers, h, ffn, vocab, s):
    """6 x matmul parameters + 12 L h s for GPT-NeoX (biases everywhere, LayerNorms, untied: the input embedding
    is a lookup and drops out, the output layer stays)."""
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (ffn * h + ffn) + (h * ffn + h) + 2 * 2 * h
    return 6 * (layers * per_layer + vocab * h + 2 * h) + 12 * layers * h * s


def llama_flops(layers, h, heads, groups, ffn, vocab, s):
    """The same for a Llama block (GQA, SwiGLU, RMSNorms, no biases) with tied embeddings: the one vocabulary
    matrix is the output layer's matmul and counts."""
    d = h // heads
    per_layer = (heads + 2 * groups) * d * h + h * h + 2 * ffn * h + ffn * h + 2 * h
    return 6 * (layers * per_layer + vocab * h + h) + 12 * layers * h * s


def test_the_gpu_benchmark_runs_at_its_tiny_cpu_size(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--size", "tiny",
                             "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_benchmark.json").read_text())
    table = (tmp_path / "out" / "gpu_benchmark.md").read_text()
    assert result.stdout.rstrip().endswith(table.rstrip())  # the figures are printed last

    flops = {"neox-tiny": neox_flops(2, 64, 256, 256, 64), "llama-tiny": llama_flops(2, 64, 4, 2, 128, 256, 64)}
    assert set(report["models"]) == set(flops)
    peak = report["peak_flops"]
    assert report["device"] == "cpu" and "measured float32 matmul" in report["peak_source"] and peak > 0
    for name, model in report["models"].items():
        arms = model["arms"]
        assert list(arms) == ["eager", "recompute", "compile", "async_save", "hf"]
        for arm, row in arms.items():
            assert row["tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0
            assert row["mfu"] == pytest.approx(row["tokens_per_s"] * flops[name] / peak, rel=1e-12)
            assert f"| {arm} |" in table
        for arm in ("eager", "recompute", "compile", "async_save"):
            row = arms[arm]
            assert row["flops_per_token"] == flops[name]
            assert len(row["losses"]) == 8 and len(row["save_wait_s"]) == 1 and row["save_wait_s"][0] > 0
            assert row["plan_bytes"] > 4e9  # megacpt plan's total includes its 4 GB reserve
        # fp32 on CPU: recompute is exact, the compiled model agrees to float rounding; the async run is eager's
        # ZeRO 1 run with another way of writing checkpoints: the same losses
        assert arms["recompute"]["max_loss_diff"] <= 1e-6
        assert arms["compile"]["max_loss_diff"] <= 1e-4
        assert arms["async_save"]["max_loss_diff"] == 0
        assert model["ratio_to_hf"] == pytest.approx(arms["eager"]["tokens_per_s"] / arms["hf"]["tokens_per_s"])
