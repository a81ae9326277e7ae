"""
Score several few-shot segmentation models on one identical episode list and test their differences.

    python scripts/compare.py --models outputs/a/best outputs/b/best --dataset synthetic --fold 0 --shot 1
    python scripts/compare.py --models ORG/NTRENET ORG/QGNET --dataset data/pascal5i --fold 0 --protocol panet

Writes comparison.json, comparison.md, comparison.png and the episode lists (episodes_seed*.jsonl, reused by later
runs) into --output-dir. The logic lives in `hf_fss.evaluation.compare`.

The same command, installed: `hf-fss compare ...` (`hf_fss.cli`).
"""

from hf_fss.evaluation.compare import main  # `pip install -e .` (the README's first command) installs hf_fss

if __name__ == "__main__":
    raise SystemExit(main())
