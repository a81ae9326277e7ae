"""
The evaluation's support cache (hf_fss.evaluation.support_cache): for every method, metrics bit-identical to the
uncached run at batch size 1 (1 and 2 shots, dense and weak annotations), one support encoding per distinct
(support image, class mask), and keys that a different mask, annotation or model state never hits.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import TINY_NTRENET_HEAD, TINY_RESNET, single_thread

from hf_fss import FewShotSegmentationImageProcessor
from hf_fss.backbones import FeatureCache
from hf_fss.data import fold_classes, load_benchmark, make_test_episodes
from hf_fss.evaluation.runner import evaluate_model
from hf_fss.evaluation.support_cache import encode_support, join_shots
from hf_fss.models.cosine_prior import CosinePriorConfig, CosinePriorModel
from hf_fss.models.crcnet import CRCNetConfig, CRCNetModel
from hf_fss.models.ntrenet import NTRENetConfig, NTRENetModel
from hf_fss.models.qgnet import QGNetConfig, QGNetModel
from hf_fss.models.smcp import SMCPConfig, SMCPModel

SIZE = 65

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _model(name: str):
    torch.manual_seed(0)
    tiny = {"backbone_kwargs": dict(TINY_RESNET), "image_size": SIZE}
    if name == "ntrenet":
        return NTRENetModel(NTRENetConfig(**tiny, **TINY_NTRENET_HEAD))
    if name == "qgnet":
        prior = {"stem": "7x7", **TINY_RESNET}
        return QGNetModel(QGNetConfig(**tiny, prior_extractor_kwargs=prior, reduce_dim=16, pyramid_bins=(2, 1)))
    if name == "crcnet":
        return CRCNetModel(CRCNetConfig(**tiny, reduce_dim=16, cross_reference_reduction=4, finetune_steps=2))
    if name == "smcp":
        return SMCPModel(SMCPConfig(backbone_kwargs={"base_width": 4}, reduce_dim=16, bottleneck_dim=8))
    return CosinePriorModel(CosinePriorConfig(**tiny))


@pytest.fixture(scope="module")
def split():
    return load_benchmark("synthetic", num_train=0, num_val=60, image_size=128)["validation"]


def _evaluate(model, split, episodes, cache=None, annotation="mask"):
    return evaluate_model(
        model,
        FewShotSegmentationImageProcessor(image_size=SIZE),
        split,
        episodes,
        class_ids=fold_classes("synthetic", 0).novel,
        annotation=annotation,
        seed=7,
        progress=False,
        feature_cache=cache,
    )


@pytest.mark.parametrize("name", ["ntrenet", "qgnet", "crcnet", "smcp", "cosine_prior"])
@pytest.mark.parametrize("shot", [1, 2])
def test_cached_metrics_are_bit_identical_for_every_method(split, name, shot):
    episodes = make_test_episodes(split, fold_classes("synthetic", 0).novel, 16, shot, seed=11)
    model = _model(name)
    plain = _evaluate(model, split, episodes)
    cache = FeatureCache(1 << 30)
    cached = _evaluate(model, split, episodes, cache)
    again = _evaluate(model, split, episodes, cache)  # another seed's run over the same episodes: all served
    assert json.dumps(cached, sort_keys=True) == json.dumps(plain, sort_keys=True)
    assert json.dumps(again, sort_keys=True) == json.dumps(plain, sort_keys=True)
    pairs = {(i, e.class_id) for e in episodes for i in e.supports}
    if shot > 1 and not model.support_shots_separable:  # CRCNet finetunes on the K shots together: not cached
        assert cache.support_hits == cache.support_misses == 0
    else:
        assert cache.support_misses == len(pairs)
        assert cache.support_hits == 2 * len(episodes) * shot - len(pairs)
    if name in ("ntrenet", "qgnet"):  # their support-free query work: one encoding per distinct query image
        queries = {e.query for e in episodes}
        assert (cache.query_misses, cache.query_hits) == (len(queries), 2 * len(episodes) - len(queries))


@pytest.mark.parametrize("annotation", ["bbox", "scribble"])
def test_weak_annotations_are_bit_identical_and_keyed_by_their_pixels(split, annotation):
    episodes = make_test_episodes(split, fold_classes("synthetic", 0).novel, 16, 1, seed=11)
    model = _model("cosine_prior")  # its prediction follows the support mask closely
    cache = FeatureCache(1 << 30)
    dense = _evaluate(model, split, episodes, cache)
    dense_misses = cache.support_misses
    weak = _evaluate(model, split, episodes, cache, annotation=annotation)
    plain = _evaluate(model, split, episodes, annotation=annotation)
    assert json.dumps(weak, sort_keys=True) == json.dumps(plain, sort_keys=True)
    assert json.dumps(weak) != json.dumps(dense)
    # No weak-annotation episode was served a dense mask's encoding: each computed its own.
    assert cache.support_misses >= dense_misses + len({(i, e.class_id) for e in episodes for i in e.supports})


def test_a_different_mask_or_changed_weights_never_hit():
    model = _model("cosine_prior").eval()
    cache = FeatureCache(1 << 30)
    pixels = torch.randn(1, 1, 3, SIZE, SIZE)
    masks = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.long)
    masks[..., 10:40, 10:40] = 1
    other = masks.clone()
    other[..., 40, 40] = 1  # one pixel more
    support = {"support_pixel_values": pixels, "support_masks": masks}
    with torch.no_grad(), cache.attach(model):
        first = encode_support(model, support, cache, ["a"])
        again = encode_support(model, support, cache, ["a"])
        assert again is first and (cache.support_hits, cache.support_misses) == (1, 1)
        encode_support(model, {**support, "support_masks": other}, cache, ["a"])
        encode_support(model, support, cache, ["a"], annotation="bbox")
        assert cache.support_misses == 3
        model.backbone.layer4[0].conv1.weight.add_(1.0)  # new weights: recomputed, never served
        changed = encode_support(model, support, cache, ["a"])
        assert cache.support_misses == 4 and not torch.equal(changed.features, first.features)
    assert cache.support_hits == 1


def test_training_mode_and_autograd_are_not_cached():
    model = _model("ntrenet")
    cache = FeatureCache(1 << 30)
    support = {"support_pixel_values": torch.randn(1, 1, 3, SIZE, SIZE), "support_masks": torch.ones(1, 1, SIZE, SIZE)}
    with cache.attach(model):
        encode_support(model.train(), support, cache, ["a"])
        with torch.no_grad():
            encode_support(model.eval(), {**support, "support_masks": support["support_masks"].long()}, cache, ["a"])
        encode_support(model, support, cache, ["a"])  # autograd on
    assert (cache.support_hits, cache.support_misses) == (0, 1)


@pytest.mark.parametrize("name", ["ntrenet", "qgnet"])
def test_query_encodings_are_served_only_to_the_attached_model_in_evaluation(name):
    model = _model(name).eval()
    cache = FeatureCache(1 << 30)
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with cache.attach(model), cache.images([(pixels, ["a", "b"])]):
        with torch.no_grad():
            first = model.query_encoding(pixels)
            again = model.query_encoding(pixels)
            assert (cache.query_misses, cache.query_hits) == (2, 2)
            for key, value in model._encode_query(pixels[1:]).items():  # row b: its batch-1 computation
                assert torch.equal(again[key][1:], value) and torch.equal(first[key], again[key]), key
            model.query_encoding(torch.randn(1, 3, SIZE, SIZE))  # an unregistered image: computed, not stored
            model.down_query[0].weight.mul_(2.0)  # new weights: recomputed, never served
            changed = model.query_encoding(pixels)
            assert cache.query_misses == 4 and not torch.equal(changed["features"], first["features"])
        model.query_encoding(pixels)  # autograd on
        with torch.no_grad():
            model.train().query_encoding(pixels)
    assert (cache.query_misses, cache.query_hits) == (4, 2)


def test_join_shots_equals_the_k_shot_encoding():
    """The K single-shot encodings joined are the K-shot encoding; each shot's tensors are computed at batch 1 where
    the K-shot call runs K images at once, which on some CPU kernels differs in the last bits (hence the tolerance:
    the evaluation metrics are asserted identical above)."""
    model = _model("smcp").eval()
    pixels = torch.randn(1, 3, 3, SIZE, SIZE)
    masks = (torch.rand(1, 3, SIZE, SIZE) > 0.5).long()
    with torch.no_grad():
        whole = model.encode_support(pixels, masks)
        joined = join_shots([model.encode_support(pixels[:, k : k + 1], masks[:, k : k + 1]) for k in range(3)])
    assert joined.shot == 3
    assert torch.equal(joined.masks, whole.masks)
    for field in ("prototype", "shot_prototypes", "features"):
        assert torch.allclose(getattr(joined, field), getattr(whole, field), rtol=1e-5, atol=1e-6), field


def test_training_validation_uses_a_fresh_cache_per_call_and_scores_as_uncached(split, monkeypatch):
    """train.py's validation and end-of-run tests (`evaluate_episodes`): cached, identical metrics, and a new cache
    per call, so weights changed by training steps in between are never served."""
    from types import SimpleNamespace

    from hf_fss.training import episodic
    from hf_fss.training.episodic_data import EpisodeSet

    made = []

    class RecordingCache(FeatureCache):
        def __init__(self, max_bytes):
            super().__init__(max_bytes)
            made.append(self)

    monkeypatch.setattr(episodic, "FeatureCache", RecordingCache)
    fold = fold_classes("synthetic", 0)
    episodes = make_test_episodes(split, fold.novel, 12, 1, seed=11)
    episode_set = EpisodeSet(split, episodes, tuple(fold.novel), None, "pfenet", 7, "validation")
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), num_processes=1, process_index=0, is_local_main_process=True,
        autocast=contextlib.nullcontext,
    )  # fmt: skip
    model = _model("cosine_prior").train()
    args = SimpleNamespace(eval_batch_size=1, dtype="float32", channels_last=False)
    processor = FewShotSegmentationImageProcessor(image_size=SIZE)
    first = episodic.evaluate_episodes(model, processor, episode_set, args, accelerator)
    assert model.training  # the training state is restored
    with torch.no_grad():
        model.backbone.layer4[0].conv1.weight.add_(torch.randn_like(model.backbone.layer4[0].conv1.weight))
    second = episodic.evaluate_episodes(model, processor, episode_set, args, accelerator)
    assert len(made) == 2 and made[0].support_hits > 0 and made[1].support_misses > 0
    assert made[1].support_misses == made[0].support_misses  # nothing carried over from the old weights
    # train.py's evaluation adds the precision it ran in (metrics.json records it); the scores are evaluate_model's
    for result in (first, second):
        assert (result.pop("dtype"), result.pop("channels_last")) == ("float32", False)
    assert json.dumps(second, sort_keys=True) == json.dumps(_evaluate(model, split, episodes), sort_keys=True)
    assert json.dumps(first, sort_keys=True) != json.dumps(second, sort_keys=True)


@pytest.mark.parametrize("annotation", ["mask", "scribble"])
def test_dataset_items_from_the_cache_are_identical_and_decoded_once(split, monkeypatch, annotation):
    from hf_fss.data import EpisodicTestDataset
    from hf_fss.data import episodes as episodes_module

    episodes = make_test_episodes(split, fold_classes("synthetic", 0).novel, 20, 2, seed=11)
    processor = FewShotSegmentationImageProcessor(image_size=SIZE)
    plain = EpisodicTestDataset(split, episodes, processor, annotation=annotation, seed=3)
    expected = [plain[i] for i in range(len(episodes))]
    decoded = []
    original = episodes_module._decode_row
    monkeypatch.setattr(episodes_module, "_decode_row", lambda s, row: decoded.append(row) or original(s, row))
    cache = FeatureCache(1 << 30)
    cached = EpisodicTestDataset(split, episodes, processor, annotation=annotation, seed=3, cache=cache)
    for _ in range(2):  # a second pass (another seed) decodes nothing
        for i, item in enumerate(cached[i] for i in range(len(episodes))):
            assert item.keys() == expected[i].keys()
            for key, value in item.items():
                assert torch.equal(value, expected[i][key]), key
    assert sorted(decoded) == sorted(set(decoded))  # each image decoded once
    assert len(set(decoded)) == len({i for e in episodes for i in (e.query, *e.supports)})
