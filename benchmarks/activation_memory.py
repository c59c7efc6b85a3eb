"""Peak memory of a megacpt training step with and without activation checkpointing (megatron-core's full
recompute), each measured in its own process (peak RSS only grows), same model and batch.

    python benchmarks/activation_memory.py --size 25m

Prints JSON on its last line: peak RSS in MiB for each setting, and the saving.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(size: str, recompute: bool) -> None:
    import time

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from train_vs_hf import SIZES, megacpt_trainer, tokens_per_s

    start = time.perf_counter()
    rate = tokens_per_s(megacpt_trainer(SIZES[size], recompute), SIZES[size], steps=3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": round(peak), "tokens_per_s": round(rate), "seconds": round(time.perf_counter() - start, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="25m")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.size, args.child == "on")
    results = {}
    for setting in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--size", args.size, "--child", setting],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[setting] = json.loads(out)
        print(f"activation checkpointing {setting}: {results[setting]}", file=sys.stderr)
    saving = results["off"]["peak_rss_mib"] - results["on"]["peak_rss_mib"]
    print(json.dumps({"size": args.size, "off": results["off"], "on": results["on"], "saving_mib": saving}))


if __name__ == "__main__":
    main()
