"""Every shipped config loads, validates and has a schedule that can run; the paper recipes hold their numbers."""
from pathlib import Path

import pytest

from megacpt.config import load_config
from megacpt.planning.capacity import Cluster, config_layout, recommend
from megacpt.schedule import check_schedule, warmup_steps

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))


def test_configs_exist():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_its_schedule_runs(path):
    config = load_config(path)
    check_schedule(config.schedule, config.train.steps)


# name -> (preset, style, max_lr, min_lr, tokens per step, token budget, replay fraction, starts from a checkpoint)
PYTHIA, NEOX = 1024 * 2048, 1104 * 2048
RECIPES = {
    "gupta_pythia410m_cpt_lr1.5e-4.json": ("pythia-410m", "cosine", 1.5e-4, 1.5e-5, PYTHIA, 297e9, 0.0, True),
    "gupta_pythia410m_cpt_lr3e-4.json": ("pythia-410m", "cosine", 3e-4, 3e-5, PYTHIA, 297e9, 0.0, True),
    "gupta_pythia410m_cpt_lr6e-4.json": ("pythia-410m", "cosine", 6e-4, 6e-5, PYTHIA, 297e9, 0.0, True),
    "ibrahim_405m_pretrain_cosine.json": ("neox-405m", "cosine", 3e-4, 3e-5, NEOX, 300e9, 0.0, False),
    "ibrahim_405m_cpt_cosine.json": ("neox-405m", "cosine", 3e-4, 3e-5, NEOX, 300e9, 0.05, True),
    "ibrahim_405m_cpt_german_cosine.json": ("neox-405m", "cosine", 3e-4, 3e-5, NEOX, 200e9, 0.25, True),
    "ibrahim_405m_infinite_cosine.json": ("neox-405m", "infinite_cosine", 3e-4, 3e-5, NEOX, 300e9, 0.05, True),
    "ibrahim_405m_infinite_inv_sqrt.json": ("neox-405m", "infinite_inv_sqrt", 3e-4, 3e-5, NEOX, 300e9, 0.05, True),
    "ibrahim_10b_pretrain_cosine.json": ("neox-10b", "cosine", 1.2e-4, 1.2e-5, NEOX, 300e9, 0.0, False),
    "ibrahim_10b_cpt_cosine.json": ("neox-10b", "cosine", 1.2e-4, 1.2e-5, NEOX, 300e9, 0.05, True),
    "ibrahim_10b_cpt_german_cosine.json": ("neox-10b", "cosine", 1.2e-4, 1.2e-5, NEOX, 200e9, 0.25, True),
    "wsd_405m.json": ("neox-405m", "wsd", 3e-4, 3e-5, NEOX, 300e9, 0.05, True),
    # Llama 3.1 8B on a new domain, 10% replay of a public web corpus; Qwen2.5 0.5B on a new language after
    # `tokenizer extend` + `extend-vocab`, 25% replay (Ibrahim et al.'s share for a strong shift)
    "llama31_8b_cpt_replay.json": ("llama-3.1-8b", "cosine", 3e-5, 3e-6, 512 * 8192, 20e9, 0.1, True),
    "qwen25_05b_new_language_extended.json": ("qwen2.5-0.5b", "cosine", 1e-4, 1e-5, 256 * 4096, 10e9, 0.25, True),
}


@pytest.mark.parametrize("name", RECIPES)
def test_paper_recipe(name):
    preset, style, max_lr, min_lr, tokens_per_step, budget, replay, from_checkpoint = RECIPES[name]
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    schedule = config.schedule
    assert (config.model.preset, schedule.style, schedule.max_lr, schedule.min_lr) == (preset, style, max_lr, min_lr)
    assert config.train.global_batch_size * config.model.seq_length == tokens_per_step
    assert config.train.steps == round(budget / tokens_per_step)
    assert warmup_steps(schedule, config.train.steps) == round(0.01 * config.train.steps)
    assert config.data.replay.fraction == replay
    assert (config.init.checkpoint is not None, config.init.mode) == (from_checkpoint, "new_stage")
    if style.startswith("infinite"):
        assert (schedule.const_lr, schedule.cooldown_end, schedule.constant_end,
                schedule.timescale) == (1.65e-4, 0.6, 0.85, 10.0)
    if style == "wsd":
        assert (schedule.decay_fraction, schedule.decay_shape) == (0.2, "1-sqrt")


def test_every_shipped_config_is_a_checked_recipe():
    assert sorted(RECIPES) == [p.name for p in CONFIGS]


# Nodes of 8 x 80 GB GPUs each config is laid out for (configs/README.md): one for ~400M models and Llama 3.1 8B,
# eight for the 10B.
NODES = {"pythia-410m": 1, "neox-405m": 1, "neox-10b": 8, "llama-3.1-8b": 1, "qwen2.5-0.5b": 1}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_uses_the_layout_megacpt_plan_recommends(path):
    config = load_config(path)
    cluster = Cluster(nodes=NODES[config.model.preset], gpus_per_node=8, gpu_memory_gb=80)
    best = recommend(config, cluster).layout
    assert config_layout(config, cluster) == best
    assert (config.deepspeed["bf16"], config.deepspeed["zero_optimization"]) == ({"enabled": True}, {"stage": 1})


def test_the_405m_layout_by_hand():
    """neox-405m on one node of 8 x 80 GB: TP 1 x DP 8, ZeRO-1, micro batch 23 (1104 / 8 = 138 per rank,
    divisible by 1, 2, 3, 6, 23, 46, ...). By hand: 405,334,016 parameters with bf16 weights and gradients and
    16 optimizer bytes over 8 ranks (6 bytes per parameter), Korthikanti's activations of 24 layers plus the
    output layer, a 4 GB reserve: 60.2 GB at micro batch 23, 114 GB at 46, against the 72 GB limit."""
    psi, s, h, v = 405_334_016, 2048, 1024, 50304

    def total_gb(b: int) -> float:
        return (2 * psi + 2 * psi + 16 * psi / 8 + 24 * s * b * h * 34 + s * b * (4 * h + 6 * v) + 4e9) / 1e9

    assert total_gb(23) == pytest.approx(60.2014, abs=1e-4) and total_gb(46) > 72
    config = load_config(CONFIGS[0].parent / "ibrahim_405m_cpt_cosine.json")
    cluster = Cluster(nodes=1, gpus_per_node=8, gpu_memory_gb=80)
    best = recommend(config, cluster)
    assert (best.layout.tensor, best.layout.data, best.layout.zero_stage, best.layout.micro_batch) == (1, 8, 1, 23)
    assert best.total_bytes / 1e9 == pytest.approx(total_gb(23), rel=1e-9)
    assert config.train.micro_batch_size == 23 and config.parallel.tensor == 1
