"""Does extending the tokenizer pay off when a prose model continues on code? Demo scale, several seeds.

    python benchmarks/vocab_extension.py --workdir /tmp/vocab_ext [--seeds 1234 1 2] [--add 512] [--quick]

The demo's corpora (English prose and Python code from the standard library, megacpt/demo/corpora.py) and
its model, batch and schedules (megacpt/demo/configs.py, FULL or --quick). The one difference from the demo:
the tokenizer is trained on prose only (same settings: --keep-whitespace, 2,048 pieces), so that stage 0 is
an English-prose model whose tokenizer serves code badly. Then, per seed:

- stage 0: the demo's stage 0 on prose with that tokenizer;
- `own`: the demo's re-warmed stage 1 on code, from stage 0, with the prose tokenizer;
- `extended`: the same stage on the same code, with the tokenizer extended by --add code pieces (`megacpt
  tokenizer extend` on the code training corpus) and stage 0 grown for it (`megacpt extend-vocab`, mean init);
- `extended_freeze`: `extended` with `train.freeze` for the first 10% of its steps.

Same compute: every stage-1 run trains the same steps x global batch x seq_length tokens (so the extended
runs read more bytes of code). Each run evaluates once, at its end, on the first N windows of both
validation sets, N the largest count that no validation set under either tokenizer repeats text for. Reported
per run: code and prose bits per byte (tokenizer-independent), the loss per token, and the training
throughput in bytes of code per second (median tokens/s of the steps after the 5th x bytes per token of the
code training data); per tokenizer: tokens per byte of the code and prose validation text (EOD excluded).
Finished runs and phases in WORKDIR are reused. Results: WORKDIR/results.json and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from megacpt.config import load_config
from megacpt.data.documents import DOCUMENT_BYTES_SUFFIX
from megacpt.demo.configs import FULL, QUICK, DemoPaths, stage0_config, stage1_config
from megacpt.demo.demo_command import corpora_phase
from megacpt.sweep.execute import is_finished, train

ARMS = ("own", "extended", "extended_freeze")
FREEZE_FRACTION = 0.1
SETS = ("code", "prose")


def megacpt(*args) -> None:
    subprocess.run([sys.executable, "-m", "megacpt", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def tokenizers(paths: DemoPaths, vocab_size: int, add: int) -> dict[str, Path]:
    """The prose-only tokenizer (the demo's settings) and its extension by code pieces."""
    folder = paths.root / "tokenizer"
    made = {"own": folder / "prose.model", "extended": folder / "prose_code.model"}
    if not made["own"].is_file():
        megacpt("tokenizer", "train", "--input", paths.corpus("prose", "train"), "--vocab-size", vocab_size,
                "--keep-whitespace", "--output", folder / "prose")
    if not made["extended"].is_file():
        megacpt("tokenizer", "extend", "--base", made["own"], "--input", paths.corpus("code", "train"),
                "--add", add, "--output", folder / "prose_code")
    return made


def dataset(paths: DemoPaths, tokenizer: str, name: str, split: str) -> Path:
    return paths.root / "data" / tokenizer / f"{name}_{split}"


def datasets(paths: DemoPaths, made: dict[str, Path]) -> None:
    """Both corpora's splits with the prose tokenizer; what stage 1 reads with the extended one."""
    for tokenizer, model in made.items():
        for name in SETS:
            for split in ("train", "val"):
                prefix = dataset(paths, tokenizer, name, split)
                if (tokenizer, name, split) == ("extended", "prose", "train") or prefix.with_suffix(".idx").is_file():
                    continue
                megacpt("preprocess", "--input", paths.corpus(name, split), "--tokenizer-type", "sentencepiece",
                        "--tokenizer-model", model, "--append-eod", "--output-prefix", prefix)


def text_stats(prefix: Path) -> dict[str, float]:
    """Tokens (EOD excluded), UTF-8 bytes and documents of a preprocessed dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(str(prefix))
    lengths = np.array(indexed.sequence_lengths, dtype=np.int64)  # a copy: the index's memory map goes with it
    size = float(np.load(str(prefix) + DOCUMENT_BYTES_SUFFIX).sum())
    return {"tokens": int(lengths.sum()) - len(lengths), "bytes": size, "documents": len(lengths),
            "tokens_with_eod": int(lengths.sum())}


def retarget(config: dict, paths: DemoPaths, run_dir: Path, tokenizer: str, model: Path, eval_samples: int) -> dict:
    """A demo config on this benchmark's tokenizer and its data, evaluated once at the end on `eval_samples`."""
    config["run_dir"] = str(run_dir)
    config["tokenizer"]["model"] = str(model)
    for key, split in (("sources", "train"), ("validation", "val")):
        for entry in config["data"][key]:
            entry["prefix"] = str(dataset(paths, tokenizer, entry["name"], split))
    config["data"]["cache_dir"] = str(run_dir.parent / "cache")
    config["train"].update(eval_interval=0, eval_samples=eval_samples)
    return config


def run(paths: DemoPaths, name: str, config: dict) -> Path:
    path = paths.root / "configs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))
    loaded = load_config(path)
    if not is_finished(loaded):
        print(f"[{name}] megacpt train {path}", flush=True)
        train(name, loaded, path, paths.logs / f"{name}.log")
    return Path(config["run_dir"])


def bytes_per_token(stats: dict) -> float:
    """UTF-8 bytes per token of training data (EOD tokens included: they are trained on too)."""
    return stats["bytes"] / stats["tokens_with_eod"]


def results(run_dir: Path, code_bytes_per_token: float) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if "eval" in r][-1]
    rates = [r["tokens_per_s"] for r in records if "loss" in r and r["step"] > 5 and r.get("tokens_per_s")]
    tokens_per_s = statistics.median(rates)
    return {"bpb": final["eval_bpb"], "loss": final["eval"], "tokens_per_s": tokens_per_s,
            "bytes_per_s": tokens_per_s * code_bytes_per_token, "eval_tokens": final["eval_tokens"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--add", type=int, default=512, help="code pieces to add to the 2,048-piece prose tokenizer")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick sizes")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    paths = DemoPaths(args.workdir.resolve())
    corpora_phase(paths, size)
    made = tokenizers(paths, size.vocab_size, args.add)
    datasets(paths, made)
    stats = {t: {n: text_stats(dataset(paths, t, n, "val")) for n in SETS} for t in made}
    train_stats = {"own": {n: text_stats(dataset(paths, "own", n, "train")) for n in SETS},
                   "extended": {"code": text_stats(dataset(paths, "extended", "code", "train"))}}
    # the most windows of seq_length + 1 tokens that every validation set holds under either tokenizer
    windows = min((s["tokens_with_eod"] - 1) // size.seq_length for per in stats.values() for s in per.values())
    extended_vocab = len(Path(made["extended"]).with_suffix(".vocab").read_text().splitlines())

    out = {"size": "quick" if args.quick else "full", "add": args.add, "vocab": {"own": size.vocab_size,
           "extended": extended_vocab}, "eval_windows": windows, "tokens_per_byte": {
           t: {n: s["tokens"] / s["bytes"] for n, s in per.items()} for t, per in stats.items()}, "seeds": {}}
    for seed in args.seeds:
        root = paths.root / "runs" / f"seed{seed}"
        stage0 = retarget(stage0_config(paths, size, seed), paths, root / "stage0", "own", made["own"], windows)
        stage0_dir = run(paths, f"seed{seed}_stage0", stage0)
        grown = root / "grown"
        if not (grown / "latest").is_file():
            megacpt("extend-vocab", "--checkpoint", stage0_dir / "checkpoints", "--tokenizer", made["extended"],
                    "--output", grown)
        out["seeds"][seed] = {"stage0": results(stage0_dir, bytes_per_token(train_stats["own"]["prose"]))}
        for arm in ARMS:
            tokenizer = "own" if arm == "own" else "extended"
            config = retarget(stage1_config(paths, size, seed, "rewarm"), paths, root / arm, tokenizer,
                              made[tokenizer], windows)
            config["init"]["checkpoint"] = str(grown if tokenizer == "extended" else stage0_dir / "checkpoints")
            if tokenizer == "extended":
                config["model"]["vocab_size"] = extended_vocab
            if arm == "extended_freeze":
                config["train"]["freeze"] = {"steps": max(int(size.stage1_steps * FREEZE_FRACTION), 1)}
            code_rate = bytes_per_token(train_stats[tokenizer]["code"])
            out["seeds"][seed][arm] = results(run(paths, f"seed{seed}_{arm}", config), code_rate)
        (paths.root / "results.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out["tokens_per_byte"]), f"eval windows {windows}")
    print_table(out)
    return 0


def print_table(out: dict) -> None:
    print("| seed | run | code bits/byte | prose bits/byte | code loss/token | training bytes/s |")
    print("|---|---|---|---|---|---|")
    for seed, per in out["seeds"].items():
        for arm, r in per.items():
            rate = f"{r['bytes_per_s']:,.0f}"
            print(f"| {seed} | {arm} | {r['bpb']['code']:.4f} | {r['bpb']['prose']:.4f} | {r['loss']['code']:.4f} "
                  f"| {rate} |")


if __name__ == "__main__":
    sys.exit(main())
