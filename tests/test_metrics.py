"""
Tests for `hf_fss.evaluation`: few-shot IoU / FB-IoU / precision, the protocol presets and the local `evaluate`
module. Expected values are counted by hand from the 4x4 maps below (in the comments), never by re-running the
formulas under test.
"""

import datetime
import json
import math
import os
import socket

import numpy as np
import pytest
import torch

from hf_fss.evaluation import (
    FEW_SHOT_IOU_PATH,
    PROTOCOLS,
    EvaluationProtocol,
    FewShotSegmentationMetric,
    aggregate_seeds,
    get_protocol,
    intersection_and_union,
    resize_label,
)

# --------------------------------------------------------------------------------------------------------------------
# Three episodes, 4x4. Class 3: A and C; class 7: B.
#
# A: prediction / target ("X" = 255, ignored)
#   1 1 0 0     1 1 1 0
#   1 1 0 0     1 1 1 0
#   0 0 0 0     0 0 0 0
#   1 0 0 0     X X 0 0
# Ignore excluded (14 pixels): predicted fg 4 (the 1 at the bottom left is ignored), target fg 6, fg intersection 4,
#   fg union 4 + 6 - 4 = 6; predicted bg 10, target bg 8, bg intersection 8, bg union 10.
# 255 as background (16 pixels): predicted fg 5, target fg 6, intersection 4, fg union 7; predicted bg 11,
#   target bg 10, bg intersection 9 (the bottom-left pixel is predicted fg), bg union 12.
A_PRED = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
A_TARGET = [[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [255, 255, 0, 0]]

# B: nothing predicted; target fg = 2 pixels.
#   fg intersection 0, fg union 2, predicted fg 0; bg intersection 14, bg union 16.
B_PRED = [[0] * 4] * 4
B_TARGET = [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]

# C: target fg = bottom-right 2x2 (4 pixels); prediction = that plus one false positive at (1, 3).
#   fg intersection 4, fg union 5, predicted fg 5; predicted bg 11, target bg 12, bg intersection 11, bg union 12.
C_PRED = [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
C_TARGET = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]

# Over A, B, C (ignore excluded):
#   class 3, sum over episodes: (4 + 4) / (6 + 5) = 8/11; mean per episode: (4/6 + 4/5) / 2 = 11/15
#   class 7: 0 / 2 = 0 (no foreground predicted)
#   mIoU: (8/11 + 0) / 2 = 4/11; mean-per-episode mIoU: (11/15 + 0) / 2 = 11/30
#   background IoU (8 + 14 + 11) / (10 + 16 + 12) = 33/38; foreground IoU (4 + 0 + 4) / (6 + 2 + 5) = 8/13
#   FB-IoU (33/38 + 8/13) / 2 = 733/988
#   precision (4 + 0 + 4) / (4 + 0 + 5) = 8/9


def t(rows):
    return torch.tensor(rows, dtype=torch.long)


def episodes():
    return [t(A_PRED), t(B_PRED), t(C_PRED)], [t(A_TARGET), t(B_TARGET), t(C_TARGET)], [3, 7, 3]


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# intersection_and_union


def test_intersection_and_union_ignores_255():
    inter, union, target = intersection_and_union(t(A_PRED), t(A_TARGET))
    assert inter.dtype == torch.long
    assert inter.tolist() == [8, 4]
    assert union.tolist() == [10, 6]
    assert target.tolist() == [8, 6]


def test_intersection_and_union_without_ignore_index_rejects_255():
    with pytest.raises(ValueError, match="labels must lie in"):
        intersection_and_union(t(A_PRED), t(A_TARGET), ignore_index=None)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_intersection_and_union_counts_as_pfenet_on_random_maps_with_ignored_pixels(num_classes):
    # The counts come from a bincount with an extra bin for ignored pixels (issue 25: no boolean gather); they must
    # equal PFENet's gather-then-count on any map, whatever the prediction holds at ignored pixels.
    generator = torch.Generator().manual_seed(num_classes)
    pred = torch.randint(0, num_classes, (61, 47), generator=generator)
    target = torch.randint(0, num_classes, (61, 47), generator=generator)
    ignored = torch.rand(61, 47, generator=generator) < 0.2
    target[ignored], pred[ignored & (torch.rand(61, 47, generator=generator) < 0.5)] = 255, 255
    inter, union, area = intersection_and_union(pred, target, num_classes)
    kept_pred, kept_target = pred[~ignored], target[~ignored]
    for c in range(num_classes):
        expected_inter = int(((kept_pred == c) & (kept_target == c)).sum())
        assert inter[c] == expected_inter and area[c] == int((kept_target == c).sum())
        assert union[c] == int((kept_pred == c).sum()) + int(area[c]) - expected_inter


def test_intersection_and_union_validates_inputs():
    with pytest.raises(ValueError, match="same shape"):
        intersection_and_union(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in"):
        intersection_and_union(torch.full((2, 2), 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer labels"):
        intersection_and_union(torch.full((2, 2), 0.5), torch.zeros(2, 2))
    # A prediction of 255 where the target is ignored is fine (PFENet writes 255 there itself).
    inter, union, _ = intersection_and_union(t([[255, 1]]), t([[255, 1]]))
    assert inter.tolist() == [0, 1] and union.tolist() == [0, 1]


def test_intersection_and_union_numpy_and_three_classes():
    # target 0 1 2 / pred 0 2 2: class 0: I 1 U 1; class 1: I 0 U 1; class 2: I 1 U 2 (pred 2 twice, target once)
    inter, union, target = intersection_and_union(np.array([0, 2, 2]), np.array([0, 1, 2]), num_classes=3)
    assert inter.tolist() == [1, 0, 1]
    assert union.tolist() == [1, 1, 2]
    assert target.tolist() == [1, 1, 1]


# --------------------------------------------------------------------------------------------------------------------
# FewShotSegmentationMetric


def test_metric_hand_computed():
    preds, targets, ids = episodes()
    metric = FewShotSegmentationMetric([3, 7], class_names={3: "cat", 7: "dog"})
    metric.update(preds, targets, ids)
    result = metric.compute()
    assert result["per_class_iou"] == {"cat": approx(8 / 11), "dog": 0.0}  # dog: no foreground prediction -> 0
    assert result["miou"] == approx(4 / 11)
    assert result["background_iou"] == approx(33 / 38)
    assert result["foreground_iou"] == approx(8 / 13)
    assert result["fbiou"] == approx(733 / 988)
    assert result["precision"] == approx(8 / 9)
    assert result["per_class_episodes"] == {"cat": 2, "dog": 1}
    assert result["num_episodes"] == 3
    json.dumps(result)  # plain Python values


def test_mean_per_episode_differs_from_sum_over_episodes():
    preds, targets, ids = episodes()
    metric = FewShotSegmentationMetric([3, 7], protocol=get_protocol("pfenet", iou_aggregation="mean-per-episode"))
    metric.update(torch.stack(preds), torch.stack(targets), torch.tensor(ids))  # batched tensor input
    result = metric.compute()
    assert result["per_class_iou"]["3"] == approx(11 / 15)  # vs 8/11 summed
    assert result["miou"] == approx(11 / 30)  # vs 4/11 summed
    # FB-IoU and precision are always accumulated over all episodes
    assert result["fbiou"] == approx(733 / 988)
    assert result["precision"] == approx(8 / 9)
    assert result["protocol"]["iou_aggregation"] == "mean-per-episode"
    assert result["protocol"]["overridden"] == ["iou_aggregation"]


def test_ignore_boundary_false_counts_255_as_background():
    protocol = get_protocol("pfenet", ignore_boundary=False)
    metric = FewShotSegmentationMetric([3], protocol=protocol)
    metric.update([t(A_PRED)], [t(A_TARGET)], [3])
    result = metric.compute()
    assert result["miou"] == approx(4 / 7)
    assert result["background_iou"] == approx(9 / 12)
    assert result["fbiou"] == approx((9 / 12 + 4 / 7) / 2)
    assert result["precision"] == approx(4 / 5)
    assert result["protocol"]["ignore_boundary"] is False

    ignored = FewShotSegmentationMetric([3])
    ignored.update([t(A_PRED)], [t(A_TARGET)], [3])
    result = ignored.compute()
    assert result["miou"] == approx(4 / 6)
    assert result["background_iou"] == approx(8 / 10)
    assert result["precision"] == 1.0


def test_class_without_episodes_is_nan_and_left_out_of_the_mean():
    preds, targets, ids = episodes()
    metric = FewShotSegmentationMetric([3, 7, 9])
    metric.update(preds, targets, ids)
    result = metric.compute()
    assert math.isnan(result["per_class_iou"]["9"])
    assert result["per_class_episodes"]["9"] == 0
    assert result["miou"] == approx(4 / 11)


def test_undefined_values_are_nan():
    # Empty target and empty prediction: union 0 -> class IoU and precision undefined; background IoU 4/4.
    metric = FewShotSegmentationMetric([5], protocol=get_protocol("pfenet", iou_aggregation="mean-per-episode"))
    metric.update([torch.zeros(2, 2, dtype=torch.long)], [torch.zeros(2, 2, dtype=torch.long)], [5])
    result = metric.compute()
    assert math.isnan(result["miou"]) and math.isnan(result["precision"]) and math.isnan(result["foreground_iou"])
    assert result["fbiou"] == 1.0  # mean over the defined background IoU only
    assert result["num_episodes"] == 1


def test_update_validation():
    metric = FewShotSegmentationMetric([3, 7])
    with pytest.raises(ValueError, match=r"class id\(s\) \[4\]"):
        metric.update([t(A_PRED)], [t(A_TARGET)], [4])
    with pytest.raises(ValueError, match="must match"):
        metric.update([t(A_PRED)], [t(A_TARGET)], [3, 7])
    with pytest.raises(ValueError, match="same size"):
        metric.update([torch.zeros(2, 2, dtype=torch.long)], [t(A_TARGET)], [3])
    with pytest.raises(ValueError, match="labels must lie in"):
        metric.update([t(A_PRED) * 2], [t(A_TARGET)], [3])
    with pytest.raises(ValueError, match="no name"):
        FewShotSegmentationMetric([3], class_names={4: "x"})
    # a sequence of names is indexed by class id (entry 0 = background)
    named = FewShotSegmentationMetric([1, 2], class_names=["background", "aeroplane", "bicycle"])
    assert named.class_names == {1: "aeroplane", 2: "bicycle"}


def test_label_size_of_the_protocol_is_enforced():
    metric = FewShotSegmentationMetric([3], protocol="hsnet")
    with pytest.raises(ValueError, match="400x400"):
        metric.update([t(A_PRED)], [t(A_TARGET)], [3])
    label = resize_label(t(A_TARGET), 400)
    assert label.shape == (400, 400)
    metric.update([torch.zeros(400, 400, dtype=torch.long)], [label], [3])
    assert metric.compute()["protocol"]["label_size"] == 400


def test_resize_label_nearest():
    # 2x2 -> 4x4 nearest: every pixel becomes a 2x2 block, 255 stays 255
    label = resize_label(np.array([[0, 1], [255, 0]], dtype=np.uint8), 4)
    assert label.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 0, 0], [255, 255, 0, 0]]
    assert resize_label(t(A_TARGET), "original").tolist() == A_TARGET


# --------------------------------------------------------------------------------------------------------------------
# Several processes: counts are summed


def test_two_halves_merged_equal_one_metric():
    preds, targets, ids = episodes()
    whole = FewShotSegmentationMetric([3, 7])
    whole.update(preds, targets, ids)
    first, second = FewShotSegmentationMetric([3, 7]), FewShotSegmentationMetric([3, 7])
    first.update(preds[:2], targets[:2], ids[:2])
    second.update(preds[2:], targets[2:], ids[2:])
    assert first.merge(second).compute() == whole.compute()


@pytest.mark.parametrize("aggregation", ["sum-over-episodes", "mean-per-episode"])
def test_reduce_sums_state_tensors_like_two_processes(aggregation):
    preds, targets, ids = episodes()
    protocol = get_protocol("pfenet", iou_aggregation=aggregation)
    whole = FewShotSegmentationMetric([3, 7], protocol=protocol)
    whole.update(preds, targets, ids)
    rank0 = FewShotSegmentationMetric([3, 7], protocol=protocol)
    rank1 = FewShotSegmentationMetric([3, 7], protocol=protocol)
    rank0.update(preds[0::2], targets[0::2], ids[0::2])
    rank1.update(preds[1::2], targets[1::2], ids[1::2])
    # What `accelerator.reduce(tensor, "sum")` returns on rank 0: its tensor plus rank 1's, in the same order.
    others = iter([v.clone() for v in rank1.state_tensors().values()])
    rank0.reduce(lambda tensor: tensor + next(others))
    assert rank0.compute() == whole.compute()
    with pytest.raises(RuntimeError, match="already"):
        rank0.reduce(lambda tensor: tensor)
    with pytest.raises(RuntimeError, match="reset"):
        rank0.update(preds, targets, ids)
    # state_tensors / load_state_tensors round trip
    copy = FewShotSegmentationMetric([3, 7], protocol=protocol)
    copy.load_state_tensors(whole.state_tensors())
    assert copy.compute() == whole.compute()


def _distributed_worker(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        preds, targets, ids = episodes()
        metric = FewShotSegmentationMetric([3, 7])
        metric.update(preds[rank::world_size], targets[rank::world_size], ids[rank::world_size])
        result = metric.reduce().compute()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_reduce_with_torch_distributed_gloo(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or "fork" not in mp.get_all_start_methods():
        pytest.skip("needs torch.distributed and the fork start method")
    # fork: the children reuse the imported modules (a spawned child would re-import torch, seconds each).
    mp.start_processes(
        _distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    preds, targets, ids = episodes()
    whole = FewShotSegmentationMetric([3, 7])
    whole.update(preds, targets, ids)
    expected = json.loads(json.dumps(whole.compute()))
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


# --------------------------------------------------------------------------------------------------------------------
# Seeds


def test_aggregate_seeds_mean_and_population_std():
    protocol = get_protocol("panet", label_size="original")
    run_a = FewShotSegmentationMetric([3], protocol=protocol, seed=1234)
    run_a.update([t(C_PRED)], [t(C_TARGET)], [3])  # IoU 4/5, precision 4/5
    run_b = FewShotSegmentationMetric([3], protocol=protocol, seed=1235)
    run_b.update([t(A_PRED)], [t(A_TARGET)], [3])  # IoU 4/6, precision 4/4
    out = aggregate_seeds([run_a.compute(), run_b.compute()])
    # mean (4/5 + 2/3) / 2 = 11/15; population std = |4/5 - 2/3| / 2 = 1/15
    assert out["miou"] == approx(11 / 15)
    assert out["miou_std"] == approx(1 / 15)
    assert out["per_class_iou"]["3"] == approx(11 / 15)
    assert out["per_class_iou_std"]["3"] == approx(1 / 15)
    # precision: mean (4/5 + 1) / 2 = 9/10, std 1/10
    assert out["precision"] == approx(9 / 10)
    assert out["precision_std"] == approx(1 / 10)
    assert out["seeds"] == [1234, 1235]
    assert out["num_runs"] == 2 and out["num_episodes"] == [1, 1]
    assert out["protocol"]["seeds"] == [1234, 1235, 1236, 1237, 1238]
    # sample std (ddof=1) = sqrt(2) * 1/15
    assert aggregate_seeds([run_a.compute(), run_b.compute()], ddof=1)["miou_std"] == approx(math.sqrt(2) / 15)


def test_aggregate_seeds_rejects_mixed_protocols():
    run_a = FewShotSegmentationMetric([3])
    run_a.update([t(C_PRED)], [t(C_TARGET)], [3])
    run_b = FewShotSegmentationMetric([3], protocol=get_protocol("pfenet", ignore_boundary=False))
    run_b.update([t(C_PRED)], [t(C_TARGET)], [3])
    with pytest.raises(ValueError, match="ignore_boundary"):
        aggregate_seeds([run_a.compute(), run_b.compute()])


# --------------------------------------------------------------------------------------------------------------------
# Protocols


def test_presets_settings_appear_in_results():
    expected = {
        "pfenet": {"label_size": "original", "num_episodes": 1000, "seeds": [321], "ignore_boundary": True},
        "hsnet": {"label_size": 400, "num_episodes": 1000, "seeds": [0], "shot_fusion": "mask-vote"},
        "panet": {"label_size": 417, "num_episodes": 1000, "seeds": [1234, 1235, 1236, 1237, 1238]},
    }
    for name, settings in expected.items():
        protocol = PROTOCOLS[name]
        size = protocol.label_size if isinstance(protocol.label_size, int) else 4
        metric = FewShotSegmentationMetric([3], protocol=name)
        metric.update([torch.zeros(size, size, dtype=torch.long)], [torch.ones(size, size, dtype=torch.long)], [3])
        recorded = metric.compute()["protocol"]
        assert recorded == protocol.to_dict()
        assert recorded["name"] == name
        assert recorded["iou_aggregation"] == "sum-over-episodes"
        for key, value in settings.items():
            assert recorded[key] == value, (name, key)
    assert FewShotSegmentationMetric([3]).protocol == PROTOCOLS["pfenet"]  # the default


def test_preset_benchmark_variants():
    assert get_protocol("pfenet", benchmark="coco").num_episodes == 20000
    assert get_protocol("pfenet", benchmark="COCO-20i").fold_convention == "interleaved"
    assert get_protocol("panet", benchmark="coco20i").fold_convention == "contiguous"
    fss = get_protocol("hsnet", benchmark="fss1000")
    assert fss.num_episodes is None and fss.label_size == 400 and fss.overridden == ()
    # a modified preset keeps its changes when switched to another benchmark
    modified = get_protocol(get_protocol("pfenet", num_episodes=5000), benchmark="coco20i")
    assert modified.num_episodes == 5000 and modified.overridden == ("num_episodes",)
    assert modified.fold_split(0).novel[:3] == (1, 5, 9)
    assert EvaluationProtocol.from_dict(modified.to_dict()) == modified


def test_protocol_errors_name_the_culprit():
    with pytest.raises(ValueError, match="'nope'"):
        get_protocol("nope")
    with pytest.raises(ValueError, match="'nope'"):
        FewShotSegmentationMetric([3], protocol="nope")
    with pytest.raises(ValueError, match="label_sizes"):
        get_protocol("pfenet", label_sizes=400)
    with pytest.raises(ValueError, match="iou_aggregation"):
        get_protocol("pfenet", iou_aggregation="mean")
    with pytest.raises(ValueError, match="fss1000"):
        get_protocol("pfenet", benchmark="fss1000")
    with pytest.raises(ValueError, match="fold_convention"):
        get_protocol("pfenet", fold_convention="interleaved")  # PASCAL-5i has contiguous folds only
    with pytest.raises(ValueError, match="unknown EvaluationProtocol field"):
        EvaluationProtocol.from_dict({"nme": "x"})


def test_unchanged_override_is_not_recorded():
    assert get_protocol("pfenet", num_episodes=1000, seeds=[321]).overridden == ()
    assert get_protocol("pfenet", seeds=[1, 2]).seeds == (1, 2)


# --------------------------------------------------------------------------------------------------------------------
# Local `evaluate` module


@pytest.fixture
def offline(monkeypatch):
    """Offline environment, and any network connection attempt fails the test."""
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def test_evaluate_module_offline_matches_the_class(offline, tmp_path):
    import evaluate

    module = evaluate.load(FEW_SHOT_IOU_PATH, cache_dir=str(tmp_path))
    preds, targets, ids = episodes()
    result = module.compute(
        predictions=[p.numpy() for p in preds],
        references=[r.numpy().astype(np.uint8) for r in targets],
        class_ids=ids,
        fold_classes=[3, 7],
    )
    metric = FewShotSegmentationMetric([3, 7])
    metric.update(preds, targets, ids)
    assert result == metric.compute()
    assert result["miou"] == approx(4 / 11)
    assert result["fbiou"] == approx(733 / 988)
    assert result["precision"] == approx(8 / 9)

    # batch by batch, tensors, a protocol override, names and a seed
    module.add_batch(predictions=torch.stack(preds[:2]), references=torch.stack(targets[:2]), class_ids=ids[:2])
    module.add(prediction=preds[2], reference=targets[2], class_ids=torch.tensor(ids[2]))
    result = module.compute(
        protocol="pfenet",
        protocol_overrides={"iou_aggregation": "mean-per-episode"},
        class_names={3: "cat", 7: "dog"},
        seed=7,
    )
    assert result["miou"] == approx(11 / 30)
    assert result["per_class_iou"] == {"cat": approx(11 / 15), "dog": 0.0}
    assert result["seed"] == 7
    assert result["protocol"]["overridden"] == ["iou_aggregation"]


def test_evaluate_module_rejects_bad_maps(offline, tmp_path):
    import evaluate

    module = evaluate.load(FEW_SHOT_IOU_PATH, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        module.add_batch(predictions=[np.zeros((1, 2, 2))], references=[np.zeros((2, 2))], class_ids=[3])
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        module.add_batch(predictions=[np.full((2, 2), 256)], references=[np.zeros((2, 2))], class_ids=[3])
