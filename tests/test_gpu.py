"""
The GPU check (`bash scripts/gpu_check.sh`, docs/development.md): every method forward and backward on CUDA in fp32,
under bf16 autocast and in channels_last; the feature cache holding CUDA tensors; `torch.compile`; and
`scripts/benchmark.py --device cuda`. Marked `gpu`: skipped where `torch.cuda.is_available()` is False (conftest.py).
"""

import gc
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import hf_fss
from hf_fss.backbones import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hf_fss_benchmark_script_gpu", ROOT / "scripts" / "benchmark.py")
benchmark_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark_script)

METHODS = sorted(hf_fss.MODEL_CLASSES)
SIZE = 65  # every method's tiny configuration runs at this side


def tiny_model(model_type: str) -> torch.nn.Module:
    """The benchmark's tiny configuration of `model_type` (the same one `benchmark.py --sizes tiny` times), on CUDA."""
    return benchmark_script.build_model(model_type, "tiny", SIZE).cuda()


def episode(shot: int = 1):
    query, support, masks = benchmark_script.random_episode(2, shot, SIZE, torch.device("cuda"))
    labels = torch.zeros(2, SIZE, SIZE, dtype=torch.long, device="cuda")
    labels[:, SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4] = 1
    return query, support, masks, labels


def forward_backward(model, query, support, masks, labels, autocast_dtype=None):
    """One training step's forward and backward; returns the logits (B, 2, H, W) and the loss."""
    model.train()
    extras = benchmark_script.training_inputs(model, labels, masks)
    with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        outputs = model(query, support, masks, labels=labels, **extras)
    if outputs.loss is not None and outputs.loss.requires_grad:  # the training-free cosine prior has no loss
        outputs.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    return outputs


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", METHODS)
@pytest.mark.parametrize("mode", ["fp32", "bf16-autocast", "channels_last"])
def test_every_method_runs_forward_and_backward_on_cuda(model_type, mode):
    model = tiny_model(model_type)
    query, support, masks, labels = episode()
    if mode == "channels_last":
        model, query = model.to(memory_format=torch.channels_last), query.contiguous(memory_format=torch.channels_last)
    outputs = forward_backward(
        model, query, support, masks, labels, torch.bfloat16 if mode == "bf16-autocast" else None
    )
    assert outputs.logits.shape == (2, 2, SIZE, SIZE) and outputs.logits.device.type == "cuda"
    assert torch.isfinite(outputs.logits.float()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", METHODS)
def test_the_feature_cache_holds_cuda_tensors_and_changes_no_metric(model_type):
    from hf_fss.data import fold_classes, load_benchmark, make_test_episodes
    from hf_fss.evaluation.loop import evaluate_model

    model = tiny_model(model_type)
    split = load_benchmark("synthetic", num_train=0, num_val=60, image_size=128)["validation"]
    novel = fold_classes("synthetic", 0).novel
    episodes = make_test_episodes(split, novel, 4, shot=1, seed=3)
    processor = hf_fss.FewShotSegmentationImageProcessor(image_size=SIZE)
    cache = FeatureCache(1 << 28)
    runs = [
        evaluate_model(model, processor, split, episodes, class_ids=novel, progress=False, feature_cache=c)
        for c in (None, cache, cache)
    ]
    assert cache.hits > 0 and cache.bytes > 0
    assert json.dumps(runs[1], sort_keys=True) == json.dumps(runs[0], sort_keys=True)
    assert json.dumps(runs[2], sort_keys=True) == json.dumps(runs[0], sort_keys=True)
    # The cached features lived in GPU memory: dropping them gives back at least their bytes.
    held = torch.cuda.memory_allocated()
    cache_bytes = cache.bytes
    cache.clear()
    gc.collect()
    assert held - torch.cuda.memory_allocated() >= cache_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", METHODS)
def test_torch_compile_gives_the_eager_logits(model_type):
    model = tiny_model(model_type).eval()
    query, support, masks, _ = episode()
    with torch.no_grad():
        eager = model(query, support, masks).logits
        compiled = torch.compile(model)(query, support, masks).logits
    # cuDNN may pick other (TF32) convolution algorithms for the compiled graph: close, not bit-equal.
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_benchmark_script_times_every_method_on_cuda(tmp_path):
    output = tmp_path / "bench.json"
    argv = ["--sizes", "tiny", "--device", "cuda", "--iterations", "2", "--warmup", "1", "--output", str(output)]
    assert benchmark_script.main(argv) == 0
    rows = json.loads(output.read_text())["results"]
    assert sorted({row["model_type"] for row in rows}) == METHODS
    assert all("not_run" not in row for row in rows)


def test_gpu_tests_are_skipped_exactly_when_cuda_is_unavailable(request):
    # The marker's skip condition is torch.cuda.is_available(), nothing else (a check that could never run them
    # would pass everywhere and prove nothing on a GPU machine).
    from conftest import gpu_skip_reason

    assert (gpu_skip_reason() is None) == torch.cuda.is_available()
    assert "gpu" in {m.split(":")[0] for m in request.config.getini("markers")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_script_refuses_a_machine_without_cuda_and_writes_nothing(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "OUT": str(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "gpu_check.sh: error: no CUDA device (torch.cuda.is_available() is False)"
    )
    assert list(tmp_path.iterdir()) == []
