"""
The names `hf_fss.evaluation.runner` has always offered, now at home in `hf_fss.evaluation.loop` (the evaluation
loop), `hf_fss.evaluation.cli` (the command line of `scripts/evaluate.py`) and `hf_fss.evaluation.arguments` (the
benchmark arguments and what they select): `from hf_fss.evaluation.runner import main, build_parser, evaluate_model,
...` keeps working.
"""

from hf_fss.evaluation.arguments import checked_fold_convention, class_names_of, default_test_split, protocol_for
from hf_fss.evaluation.cli import (
    DTYPES,
    _load_model_and_processor,  # noqa: F401  (tests load models with it)
    build_parser,
    check_outputs,
    load_model_with_overrides,
    main,
    model_config_overrides,
    run_evaluation,
    write_json_atomic,
)
from hf_fss.evaluation.loop import (
    combine_seed_runs,
    default_feature_cache_bytes,
    evaluate_model,
    model_input_names,
    needs_cpu_fallback,
)
from hf_fss.utils import check_model_path

__all__ = [
    "DTYPES",
    "build_parser",
    "check_model_path",
    "check_outputs",
    "checked_fold_convention",
    "class_names_of",
    "combine_seed_runs",
    "default_feature_cache_bytes",
    "default_test_split",
    "evaluate_model",
    "load_model_with_overrides",
    "main",
    "model_config_overrides",
    "model_input_names",
    "needs_cpu_fallback",
    "protocol_for",
    "run_evaluation",
    "write_json_atomic",
]
