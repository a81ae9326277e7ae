"""
Score several few-shot segmentation models on one identical episode list and test their differences.

    python scripts/compare.py --models outputs/a/best outputs/b/best --dataset synthetic --fold 0 --shot 1
    python scripts/compare.py --models ORG/NTRENET ORG/QGNET --dataset data/pascal5i --fold 0 --protocol panet

Writes comparison.json, comparison.md, comparison.png and the episode lists (episodes_seed*.jsonl, reused by later
runs) into --output-dir. The logic lives in `hf_fss.evaluation.compare`.
"""

import sys
from pathlib import Path

# Keep this folder off the import path, so that scripts/evaluate.py does not shadow the `evaluate` library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

try:
    from hf_fss.evaluation.compare import main
except ModuleNotFoundError as err:  # run from a checkout without `pip install -e .`
    if err.name != "hf_fss":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_fss.evaluation.compare import main

if __name__ == "__main__":
    sys.exit(main())
