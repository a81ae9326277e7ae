"""
Evaluate a few-shot segmentation model on fixed, seeded test episodes and write metrics.json.

    python scripts/evaluate.py --model outputs/quickstart/best --dataset synthetic --fold 0 --shot 1
    accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py --model ORG/NAME --dataset data/pascal5i \
        --benchmark pascal5i --fold 0 --shot 1 --output metrics.json          # same numbers as one process
    python scripts/evaluate.py ... --protocol panet                           # five seeds, mean and std
    python scripts/evaluate.py ... --save-episodes episodes.jsonl             # or --episodes-file episodes.jsonl

The loop lives in `hf_fss.evaluation.runner` (train.py validates with the same code).
"""

import sys
from pathlib import Path

# This file is named like the `evaluate` library: keep its folder off the import path so the library stays importable.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

try:
    from hf_fss.evaluation.runner import main
except ModuleNotFoundError as err:  # run from a checkout without `pip install -e .`
    if err.name != "hf_fss":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_fss.evaluation.runner import main

if __name__ == "__main__":
    sys.exit(main())
