"""`make bench`: runs every benchmark part and writes one JSON per part plus a summary.

Speed is only compared within one run (ratios), since these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

PARTS = ("data_bench", "train_bench")


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    parser.add_argument("--only", choices=PARTS, nargs="*", default=list(PARTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"environment": environment(), "parts": {}}
    for name in args.only:
        module = importlib.import_module(f"benchmarks.{name}")
        result = module.run(args.out / name)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
        summary["parts"][name] = result
        print(f"{name}: {json.dumps(result, indent=2)}")
    data, train = summary["parts"].get("data_bench"), summary["parts"].get("train_bench")
    if data and train:
        # One training sample is one image: how many times faster the shards are read than a step consumes them.
        ratio = data["shard_read"]["images_per_s"] / train["samples_per_s"]
        data["train_step_consumption_ratio"] = summary["read_over_train_consumption"] = round(ratio, 2)
        (args.out / "data_bench.json").write_text(json.dumps(data, indent=2))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
