"""`scripts/evaluate.py` with the test-time-adaptation test model registered (`accelerate launch tests/tta_evaluate.py ...`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tta_model  # noqa: E402, F401  (registers the model with the Auto classes)

from hf_fss.evaluation.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
