"""scripts/benchmark.py times every method on the same inputs and writes its record."""

import importlib.util
import json
from pathlib import Path

import hf_fss

ROOT = Path(__file__).resolve().parents[1]
# Loaded from its path: putting scripts/ on sys.path would let scripts/evaluate.py shadow the `evaluate` library.
_spec = importlib.util.spec_from_file_location("hf_fss_benchmark_script", ROOT / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def test_benchmark_writes_a_row_per_method_and_shot(tmp_path, capsys):
    output = tmp_path / "bench.json"
    argv = ["--sizes", "tiny", "--shots", "1", "2", "--image-size", "65", "--iterations", "1", "--warmup", "0",
            "--model-kwargs", '{"finetune_steps": 3, "refinement_steps": 2}']  # fmt: skip
    assert benchmark.main([*argv, "--output", str(output)]) == 0
    record = json.loads(output.read_text())
    rows = record["results"]
    assert {(r["model_type"], r["shot"]) for r in rows} == {(m, k) for m in hf_fss.MODEL_CLASSES for k in (1, 2)}
    for row in rows:
        assert row["full_latency_ms"] > 0 and row["query_only_latency_ms"] > 0 and row["parameters"] > 0
        assert abs(row["support_reuse_speedup"] - row["full_latency_ms"] / row["query_only_latency_ms"]) < 1e-9
        assert row["encode_support_latency_ms"] > 0
        for prefix in ("full", "query_only", "encode_support"):  # per-episode CPU time and page faults from getrusage
            for field in ("user_ms", "system_ms", "minor_faults", "major_faults"):
                value = row[f"{prefix}_{field}"]
                assert isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, (field, value)
    out = capsys.readouterr().out
    assert "reuse x" in out and "sys ms" in out and "minflt" in out and "encode ms" in out
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left


def test_benchmark_refuses_model_kwargs_no_method_has(capsys):
    import pytest

    with pytest.raises(SystemExit):
        benchmark.main(["--model-types", "ntrenet", "--model-kwargs", '{"finetune_steps": 3}'])
    assert "no selected method's config has these fields" in capsys.readouterr().err
