"""scripts/benchmark.py times every method on the same inputs and writes its record."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

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
        # SegGPT takes only its architecture's size (32 for the tiny one): --image-size does not apply to it.
        assert row["image_size"] == (32 if row["model_type"] == "seggpt_fss" else 65)
        assert row["gflop_per_episode"] > 0 and row["support_once_8_queries_latency_ms"] > 0
        share = row["gflop_per_episode"] / (row["full_latency_ms"] / 1000) / record["matmul_peak_gflops"]
        assert abs(row["matmul_peak_share"] - share) < 1e-9
        # The training-free baseline and the SegGPT adapter (not trained by hf_fss) have no training step.
        trainable = row["model_type"] not in ("cosine_prior", "seggpt_fss")
        assert ("training_step_latency_ms" in row) == trainable
        assert row["encode_support_latency_ms"] > 0  # the per-support-set cost (CRCNet: its finetuning)
        # Methods with several test-time passes (SMCP) are also timed with one; the others have no such row.
        model_class = hf_fss.MODEL_CLASSES[row["model_type"]][1]
        if model_class.single_pass_overrides:
            assert row["single_pass_latency_ms"] > 0
            assert abs(row["test_time_passes_cost"] - row["full_latency_ms"] / row["single_pass_latency_ms"]) < 1e-9
        else:
            assert row["single_pass_latency_ms"] is None and row["test_time_passes_cost"] is None
        for prefix in ("full", "query_only", "encode_support"):  # per-call CPU time and page faults (getrusage)
            for field in ("user_ms", "system_ms", "minor_faults", "major_faults"):
                value = row[f"{prefix}_{field}"]
                assert isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, (field, value)
    out = capsys.readouterr().out
    assert "reuse x" in out and "sys ms" in out and "minflt" in out and "GFLOP" in out and "matmul peak" in out
    assert "passes x" in out and any(m.single_pass_overrides for _, m in hf_fss.MODEL_CLASSES.values())
    assert "encode ms" in out and record["model_kwargs"] == {"finetune_steps": 3, "refinement_steps": 2}
    assert "warning: --warmup 0: the first timed call of each row includes one-time costs" in out  # ratios skewed
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temporary file left


def test_the_warmup_warning_is_printed_only_without_warmup(capsys):
    argv = ["--model-types", "cosine_prior", "--sizes", "tiny", "--image-size", "33", "--iterations", "1"]
    for warmup, warned in (("1", False), ("0", True)):
        assert benchmark.main([*argv, "--warmup", warmup]) == 0
        assert ("warning: --warmup 0" in capsys.readouterr().out) == warned


# A stand-in for an official checkout: the official module path (model/ourmodel.py), constructor and forward
# signatures and checkpoint key names, around a tiny hf_fss NTRENet so the test runs in seconds. `offset` makes two
# checkouts distinguishable (both define the package `model`, as official repositories do).
STAND_IN = """
import torch
from torch import nn

from hf_fss import NTRENetConfig, NTRENetModel
from hf_fss.models.ntrenet.convert_ntrenet import our_key_to_original

OFFSET = {offset}


class NTRENet(nn.Module):
    def __init__(self, layers=50, classes=2, zoom_factor=8, pretrained=True, shot=1, ppm_scales=(60, 30, 15, 8)):
        super().__init__()
        tiny = {{"base_width": 8, "depths": [1, 1, 1, 1]}}
        self.inner = NTRENetModel(NTRENetConfig(backbone_kwargs=tiny, reduce_dim=16, background_prototype_dim=16))

    def state_dict(self, *args, **kwargs):
        return {{our_key_to_original(k, False): v for k, v in self.inner.state_dict().items()}}

    def forward(self, s_x, s_y, x, y, classes):
        return self.inner(x, s_x, s_y.long()).logits + OFFSET
"""


def _stand_in_checkout(folder: Path, offset: float) -> Path:
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "__init__.py").write_text("")
    (folder / "model" / "ourmodel.py").write_text(STAND_IN.format(offset=offset))
    return folder


def test_official_comparison_times_both_interleaved_on_converted_weights(tmp_path, capsys):
    checkout = _stand_in_checkout(tmp_path / "nertnet", 0.0)
    output = tmp_path / "official.json"
    argv = ["--official", f"ntrenet={checkout}", "--shots", "1", "2", "--image-size", "65", "--iterations", "2"]
    assert benchmark.main([*argv, "--warmup", "0", "--output", str(output)]) == 0
    rows = json.loads(output.read_text())["results"]
    assert [(r["model_type"], r["shot"]) for r in rows] == [("ntrenet", 1), ("ntrenet", 2)]
    for row in rows:
        assert len(row["calls_s"]["official"]) == len(row["calls_s"]["hf_fss"]) == 2
        assert row["max_abs_logit_difference"] < 1e-5  # the converter put the official weights in place
        assert abs(row["hf_fss_over_official"] - row["hf_fss_latency_ms"] / row["official_latency_ms"]) < 1e-9
    assert "hf_fss/official" in capsys.readouterr().out


def test_official_checkouts_with_the_same_package_name_do_not_mix(tmp_path):
    from hf_fss.models.official import import_from_checkout

    first = import_from_checkout(_stand_in_checkout(tmp_path / "a", 1.0), "model.ourmodel", "NTRENet")
    second = import_from_checkout(_stand_in_checkout(tmp_path / "b", 2.0), "model.ourmodel", "NTRENet")
    assert (first.forward.__globals__["OFFSET"], second.forward.__globals__["OFFSET"]) == (1.0, 2.0)
    assert "model" not in sys.modules and "model.ourmodel" not in sys.modules  # nothing left for the next one


def test_official_flag_errors_name_the_problem(tmp_path, capsys):
    for value, message in [
        ("ntrenet", "takes METHOD=DIR"),
        ("cosine_prior=.", "no official-code builder for 'cosine_prior'; methods with one: ['ntrenet'"),
        (f"ntrenet={tmp_path / 'missing'}", "is not a folder"),
    ]:
        with pytest.raises(SystemExit) as exit:
            benchmark.main(["--official", value])
        assert exit.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not hold model/ourmodel.py"):
        benchmark.official_builder("ntrenet")(tmp_path)


# A stand-in for the official SMCP checkout: the module path (models/vgg_test.py, no __init__.py, as upstream), its
# `from torchvision import models` + `models.vgg16()`, the constructor and forward signatures, the checkpoint key names
# and the forward's one CUDA-only statement, around a tiny hf_fss SMCP. The pseudo-mask `label` multiplies the query,
# so the forward fails unless the builder's device fix put it on the query's device.
SMCP_STAND_IN = """
import numpy as np
import torch
from torch import nn
from torchvision import models

from hf_fss import SMCPConfig, SMCPModel
from hf_fss.models.smcp.convert_smcp import our_key_to_original


class Encoder(nn.Module):
    def __init__(self, pretrained_path=None):
        super().__init__()
        self.vgg_layers = len(models.vgg16().features)
        tiny = {"backbone_kwargs": {"base_width": 4}, "reduce_dim": 16, "bottleneck_dim": 8, "num_base_classes": 5}
        self.inner = SMCPModel(SMCPConfig(**tiny))

    def state_dict(self, *args, **kwargs):
        return {our_key_to_original(k): v for k, v in self.inner.state_dict().items()}

    def forward(self, sup_imgs, qry_imgs, sup_mask):
        label = np.ones(qry_imgs.shape[-2:], dtype=np.int64)
        label = torch.from_numpy(label).cuda().unsqueeze(0).unsqueeze(0)
        return self.inner(qry_imgs * label, sup_imgs[:, None], sup_mask[:, None].long()).logits
"""


def _smcp_stand_in_checkout(folder: Path) -> Path:
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "vgg_test.py").write_text(SMCP_STAND_IN)
    return folder


def _torchvision_modules() -> dict:
    return {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}


def test_official_smcp_runs_the_unmodified_checkout_and_lists_the_shots_it_cannot(tmp_path, capsys):
    checkout = _smcp_stand_in_checkout(tmp_path / "smcp")
    before, torchvision_before = (checkout / "models" / "vgg_test.py").read_text(), _torchvision_modules()
    output = tmp_path / "official.json"
    argv = ["--official", f"smcp={checkout}", "--shots", "1", "2", "--image-size", "65", "--iterations", "1"]
    assert benchmark.main([*argv, "--warmup", "0", "--output", str(output)]) == 0
    one, two = json.loads(output.read_text())["results"]
    assert (one["model_type"], one["shot"], two["shot"]) == ("smcp", 1, 2)
    assert one["max_abs_logit_difference"] < 1e-5 and len(one["calls_s"]["official"]) == 1
    assert "1-shot only" in two["not_run"] and "official_latency_ms" not in two
    out = capsys.readouterr().out
    assert "hf_fss/official" in out and "not run: the official SMCP code is 1-shot only" in out
    # The fixes were made in memory: the file still has its .cuda(), and the import left no module behind.
    assert (checkout / "models" / "vgg_test.py").read_text() == before
    assert _torchvision_modules() == torchvision_before and "models.vgg_test" not in sys.modules


def test_official_smcp_builder_errors_name_the_problem(tmp_path):
    from hf_fss.models.smcp.convert_smcp import build_official_model

    checkout = _smcp_stand_in_checkout(tmp_path / "smcp")
    built = build_official_model(checkout, image_size=33)
    assert built.module.vgg_layers == 31  # torchvision's VGG-16 `features`, real or the stand-in
    episode = (torch.zeros(2, 3, 33, 33), torch.zeros(2, 1, 3, 33, 33), torch.zeros(2, 1, 33, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="one episode per call"):
        built.forward(*episode)
    with pytest.raises(ValueError, match="1-shot only"):
        build_official_model(checkout, shot=5)
    with pytest.raises(FileNotFoundError, match="does not hold models/vgg_test.py"):
        build_official_model(tmp_path)
    edited = checkout / "models" / "vgg_test.py"
    edited.write_text(SMCP_STAND_IN.replace(".cuda()", ""))  # someone's CPU copy: not the file the fix is for
    with pytest.raises(ValueError, match=r"holds 'torch.from_numpy\(label\).cuda\(\)' 0 times"):
        build_official_model(checkout)


def test_flops_are_counted_and_each_method_has_its_own_test_size():
    from hf_fss import NTRENetConfig, NTRENetModel

    assert benchmark.default_image_size("ntrenet") == 473
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    gflop = benchmark.count_gflop(lambda: conv(torch.zeros(1, 3, 10, 10)))
    assert abs(gflop - 2 * 8 * 3 * 9 * 100 / 1e9) < 1e-15  # 2 FLOP per multiply-add
    inputs = benchmark.training_inputs(NTRENetModel, torch.zeros(2, 5, 5), torch.zeros(2, 1, 5, 5))
    assert list(inputs) == ["class_ids"] and inputs["class_ids"].tolist() == [1, 1]
    assert NTRENetConfig().image_size == 473


def test_benchmark_refuses_model_kwargs_no_method_has(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--model-types", "ntrenet", "--model-kwargs", '{"finetune_steps": 3}'])
    assert "no selected method's config has these fields" in capsys.readouterr().err
