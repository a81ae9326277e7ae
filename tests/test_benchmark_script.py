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
    argv = ["--sizes", "tiny", "--shots", "1", "2", "--image-size", "65", "--iterations", "1", "--warmup", "0"]
    assert benchmark.main([*argv, "--output", str(output)]) == 0
    record = json.loads(output.read_text())
    rows = record["results"]
    assert {(r["model_type"], r["shot"]) for r in rows} == {(m, k) for m in hf_fss.MODEL_CLASSES for k in (1, 2)}
    for row in rows:
        assert row["full_latency_ms"] > 0 and row["query_only_latency_ms"] > 0 and row["parameters"] > 0
        assert abs(row["support_reuse_speedup"] - row["full_latency_ms"] / row["query_only_latency_ms"]) < 1e-9
        # FlopCounterMode's count: the query-only call skips the support encoding, so it counts fewer GFLOP.
        assert 0 < row["query_only_gflop"] < row["full_gflop"] and row["image_size"] == 65
        assert row["full_peak_share"] == row["full_gflops_per_s"] / record["matmul_peak_gflops"] > 0
        for prefix in ("full", "query_only"):  # per-episode CPU time and page faults from getrusage
            for field in ("user_ms", "system_ms", "minor_faults", "major_faults"):
                value = row[f"{prefix}_{field}"]
                assert isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, (field, value)
    out = capsys.readouterr().out
    assert "reuse x" in out and "sys ms" in out and "minflt" in out
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left


def test_methods_default_to_their_papers_image_size():
    assert [benchmark.paper_image_size(m) for m in ("ntrenet", "qgnet", "smcp", "crcnet")] == [473, 473, 417, 321]
    config_class, _ = hf_fss.MODEL_CLASSES["cosine_prior"]
    assert benchmark.paper_image_size("cosine_prior") == config_class().image_size


def test_gflop_count_of_a_known_convolution():
    import torch

    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.randn(1, 3, 10, 10)
    assert benchmark.count_gflop(lambda: conv(x)) * 1e9 == 2 * 8 * 3 * 9 * 100  # 2 x MACs
