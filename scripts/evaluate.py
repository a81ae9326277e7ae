"""
Evaluate a few-shot segmentation model on fixed, seeded test episodes and write metrics.json.

    python scripts/evaluate.py --model outputs/quickstart/best --dataset synthetic --fold 0 --shot 1
    accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py --model ORG/NAME --dataset data/pascal5i \
        --benchmark pascal5i --fold 0 --shot 1 --output metrics.json          # same numbers as one process
    python scripts/evaluate.py ... --protocol panet                           # five seeds, mean and std
    python scripts/evaluate.py ... --save-episodes episodes.jsonl             # or --episodes-file episodes.jsonl

The loop lives in `hf_fss.evaluation.runner` (train.py validates with the same code).

The same command, installed: `hf-fss evaluate ...` (`hf_fss.cli`).
"""

# Named like the `evaluate` library, which hf_fss imports only inside `evaluate.load` of its metric (never on
# this command's path): this folder, sys.path[0] here, would shadow it.

from hf_fss.evaluation.runner import main  # `pip install -e .` (the README's first command) installs hf_fss

if __name__ == "__main__":
    raise SystemExit(main())
