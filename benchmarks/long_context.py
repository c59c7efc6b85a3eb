"""The long-context experiment on a laptop: the demo's stage 0 (length 128, prose) continued at length 512.

Per seed, from the demo's cosine stage 0 (made here with the demo's own phases, or reused with --demo SEED=DIR),
a new stage continues on prose and code (half each; code files are long) at seq_length 512 for the tokens of one
demo stage-1 arm (150 steps x 16 x 128 = 150 x 4 x 512), re-warmed like the demo's stage 1, in the arms

    none   the RoPE of stage 0 (base 10,000, no scaling): positions past 128 were never seen
    pi     position interpolation (Chen et al. 2023): rope_scaling linear, factor 4
    abf    adjusted base frequency (Xiong et al. 2023): rotary_base 10,000 x 50
    yarn   YaRN (Peng et al. 2023): rope_scaling yarn, factor 4 from 128 positions, betas 32 and 1
    best+mask  the best of these four (lowest mean loss at positions 384-511 over seeds and sets) with
           data.document_mask

Every arm is evaluated by position buckets of 128 on the prose and code validation sets before (stage 0's
weights under the arm's RoPE, `megacpt eval --position-bucket 128`) and after (the stage's last evaluation).
Positions 0-127 of a 512-token window see only the window's first 128 tokens (causal attention), so their
loss is the loss at length 128: forgetting of short context. The first seed's best+mask run is exported to
Hugging Face and its logits at positions 384-511 of a code validation window compared with megacpt's.

    python benchmarks/long_context.py --workdir lc --seeds 1234 1 2
    (three stage 0s and 15 stages of 150 steps, each stage about a minute on 2 idle cores; writes
    lc/summary.json and lc/long_context.png)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from megacpt.config import load_config
from megacpt.demo.configs import FULL, QUICK, STAGE0, DemoPaths, stage0_config
from megacpt.demo.corpora import CORPORA
from megacpt.demo.demo_command import corpora_phase, datasets_phase, tokenizer_phase, train_phase
from megacpt.run_dir import checkpoint_dir, read_metrics
from megacpt.sweep.execute import Job, is_finished, megacpt_command, run_jobs, train
from megacpt.sweep.grid import write_once

LENGTH, BUCKET = 512, 128
RESCALES = {"none": {}, "pi": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "abf": {"rotary_base": 500000},
            "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}}}
BUCKETS = ("0-127", "384-511")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--demo", nargs="*", default=[], metavar="SEED=DIR",
                        help="reuse the stage 0 of `megacpt demo --seed SEED --workdir DIR` (full size)")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick size and 20 steps: a smoke run")
    args = parser.parse_args()
    root = args.workdir.resolve()
    demos = {int(s): Path(d).resolve() for s, d in (item.split("=", 1) for item in args.demo)}
    steps = 20 if args.quick else FULL.stage1_steps
    results: dict[int, dict[str, dict]] = {}
    for seed in args.seeds:
        paths = DemoPaths(demos.get(seed, root / f"demo-{seed}"))
        stage0 = ensure_stage0(paths, seed, args.quick)
        results[seed] = {arm: run_arm(root, paths, stage0, seed, arm, RESCALES[arm], False, steps)
                         for arm in RESCALES}
    best = min(RESCALES, key=lambda arm: statistics.mean(
        results[s][arm]["after"][name]["384-511"] for s in args.seeds for name in CORPORA))
    for seed in args.seeds:
        paths = DemoPaths(demos.get(seed, root / f"demo-{seed}"))
        stage0 = checkpoint_dir(paths.run_dir(STAGE0))
        results[seed][f"{best}+mask"] = run_arm(root, paths, stage0, seed, f"{best}+mask", RESCALES[best], True, steps)
    export = export_check(root, args.seeds[0], f"{best}+mask")
    summary = {"seeds": args.seeds, "steps": steps, "best": best, "export_max_logit_difference_384_511": export,
               "results": {str(s): r for s, r in results.items()}}
    (root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    plot(summary, root / "long_context.png")


def ensure_stage0(paths: DemoPaths, seed: int, quick: bool) -> Path:
    """The demo's cosine stage 0 for this seed, trained with the demo's own phases unless it exists."""
    size = QUICK if quick else FULL
    corpora_phase(paths, size)
    tokenizer_phase(paths, size)
    datasets_phase(paths)
    write_once(paths.config(STAGE0), stage0_config(paths, size, seed))
    train_phase(paths, STAGE0)
    return checkpoint_dir(paths.run_dir(STAGE0))


def arm_config(root: Path, paths: DemoPaths, stage0: Path, seed: int, arm: str, rescale: dict, mask: bool,
               steps: int) -> dict:
    """Stage 0's config at length 512 on prose and code, as a re-warmed new stage from its weights."""
    config = json.loads(paths.config(STAGE0).read_text())
    batch = config["train"]["global_batch_size"] * config["model"]["seq_length"] // LENGTH
    config["run_dir"] = str(root / "runs" / str(seed) / arm)
    config["model"].update(seq_length=LENGTH, **rescale)
    config["data"]["sources"] = [{"name": name, "prefix": str(paths.dataset(name, "train")), "weight": 0.5}
                                 for name in CORPORA]
    config["data"]["document_mask"] = mask
    config["train"].update(steps=steps, global_batch_size=batch, micro_batch_size=batch, eval_interval=steps // 5,
                           eval_samples=16, eval_position_bucket=BUCKET, save_interval=0)
    config["init"] = {"checkpoint": str(stage0), "mode": "new_stage", "load_optimizer": False,
                      "load_scheduler": False, "load_data_position": False}
    return config


def run_arm(root: Path, paths: DemoPaths, stage0: Path, seed: int, arm: str, rescale: dict, mask: bool,
            steps: int) -> dict:
    """Train one arm (reused when finished) and return its loss by position before and after."""
    config_path = root / "configs" / f"{seed}_{arm}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    write_once(config_path, arm_config(root, paths, stage0, seed, arm, rescale, mask, steps))
    logs = root / "logs"
    before_json = root / "before" / f"{seed}_{arm}.json"
    if not before_json.is_file():
        before_json.parent.mkdir(parents=True, exist_ok=True)
        run_jobs([Job(f"{seed} {arm} before", megacpt_command(
            "eval", str(config_path), "--checkpoint", str(stage0), "--position-bucket", str(BUCKET),
            "--json", str(before_json)), logs / f"{seed}_{arm}_before.log")])
    config = load_config(config_path)
    if not is_finished(config):
        print(f"[{seed} {arm}] megacpt train {config_path}", flush=True)
        train(f"{seed} {arm}", config, config_path, logs / f"{seed}_{arm}.log", step_every=config.train.eval_interval)
    before = json.loads(before_json.read_text())["results"]
    last = [r for r in read_metrics(Path(config.run_dir)) if "eval_by_position" in r][-1]
    return {"before": {name: before[name]["by_position"] for name in CORPORA},
            "after": {name: last["eval_by_position"][name] for name in CORPORA}}


def export_check(root: Path, seed: int, arm: str) -> float:
    """Export the run to Hugging Face and compare the logits at positions 384-511 of a code validation window."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM

    from megacpt.runtime.distributed import setup_world
    from megacpt.weights import checkpoint_io

    config = load_config(root / "configs" / f"{seed}_{arm}.json")
    checkpoints = checkpoint_dir(Path(config.run_dir))
    hf_dir = root / "hf" / f"{seed}_{arm}"
    if not hf_dir.is_dir():
        run_jobs([Job("export", megacpt_command("convert", "megacpt-to-hf", "--checkpoint", str(checkpoints),
                                                "--output", str(hf_dir)), root / "logs" / "export.log")])
    code_val = next(v.prefix for v in config.data.validation if v.name == "code")
    tokens = IndexedDataset(str(code_val))
    documents, total = [], 0
    while total < LENGTH:  # the documents one after the other, as a packed validation window holds them
        documents.append(tokens[len(documents)])
        total += len(documents[-1])
    window = torch.from_numpy(np.concatenate(documents)[:LENGTH].astype("int64"))[None]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    source = checkpoint_io.load(checkpoints)
    world = setup_world(1, seed=0)
    ours = checkpoint_io.build_model(source.model, source.weights, 1, 0, world.device)
    vocab = source.model.vocab_size
    with torch.no_grad():
        theirs = hf(window).logits[0, 384:, :vocab]
        mine = ours(window, torch.arange(LENGTH)[None], None)[0, 384:, :vocab]
    difference = (theirs - mine).abs().max().item()
    print(f"[export] {hf_dir}: max |logit difference| at positions 384-511 {difference:.2e}", flush=True)
    return difference


def table(summary: dict) -> str:
    """Markdown: per seed and arm, the loss at positions 0-127 and 384-511 of each set, before -> after."""
    head = "| seed | arm | " + " | ".join(f"{name} {b}" for name in CORPORA for b in BUCKETS) + " |"
    rows = [head, "|" + "---|" * (2 + len(CORPORA) * len(BUCKETS))]
    for seed, arms in summary["results"].items():
        for arm, r in arms.items():
            cells = [f"{r['before'][name][b]:.3f} -> {r['after'][name][b]:.3f}" for name in CORPORA for b in BUCKETS]
            rows.append(f"| {seed} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(summary: dict, output: Path) -> None:
    """Loss against position bucket, mean over seeds: stage 0 (before, no RoPE change) and each arm after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(summary["results"])
    arms = list(summary["results"][seeds[0]])
    fig, axes = plt.subplots(1, len(CORPORA), figsize=(5 * len(CORPORA), 3.6), sharey=False)
    for ax, name in zip(axes, CORPORA):
        buckets = list(summary["results"][seeds[0]]["none"]["before"][name])
        x = range(len(buckets))

        def mean(arm: str, when: str) -> list[float]:
            return [statistics.mean(summary["results"][s][arm][when][name][b] for s in seeds) for b in buckets]

        ax.plot(x, mean("none", "before"), "k--", label="stage 0 (length 128)")
        for arm in arms:
            ax.plot(x, mean(arm, "after"), marker="o", label=arm)
        ax.set_xticks(list(x), buckets)
        ax.set_xlabel("position in the 512-token window")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{name}, mean of {len(seeds)} seeds")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    print(f"[plot] {output}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
