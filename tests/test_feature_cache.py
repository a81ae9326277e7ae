"""
The evaluation feature cache (hf_fss.backbones.feature_cache): metrics bit-identical to the uncached run for every
tested model and shot, one extractor pass per distinct image, LRU eviction, and no serving of a copy, of changed
weights or of a feature the model modified in place.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_DINOV2, TINY_NTRENET_HEAD, TINY_RESNET, single_thread

from hf_fss import FewShotSegmentationImageProcessor
from hf_fss.backbones import FeatureCache
from hf_fss.data import fold_classes, load_benchmark, make_test_episodes
from hf_fss.evaluation.runner import evaluate_model
from hf_fss.models.cosine_prior import CosinePriorConfig, CosinePriorModel
from hf_fss.models.ntrenet import NTRENetConfig, NTRENetModel

SIZE = 65


_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def split():
    return load_benchmark("synthetic", num_train=0, num_val=60, image_size=128)["validation"]


def _models():
    torch.manual_seed(0)
    ntrenet = NTRENetModel(NTRENetConfig(backbone_kwargs=dict(TINY_RESNET), **TINY_NTRENET_HEAD, image_size=SIZE))
    prior = CosinePriorModel(CosinePriorConfig(backbone_kwargs=dict(TINY_RESNET), image_size=SIZE))
    # A transformers backbone: its cache entries hold all five stages (a resized output cannot be continued exactly);
    # the cosine prior with PFENet's masked input runs layer4 on a map (start > 0), never cached.
    ntrenet_dinov2 = NTRENetModel(NTRENetConfig(backbone_config=TINY_DINOV2, **TINY_NTRENET_HEAD, image_size=SIZE))
    prior_dinov2 = CosinePriorModel(CosinePriorConfig(backbone_config=TINY_DINOV2, support_masking="input",
                                                      image_size=SIZE))  # fmt: skip
    return {"ntrenet": ntrenet, "cosine_prior": prior, "ntrenet_dinov2": ntrenet_dinov2, "prior_dinov2": prior_dinov2}


def _evaluate(model, split, episodes, cache=None, batch_size=1):
    fold = fold_classes("synthetic", 0)
    return evaluate_model(
        model,
        FewShotSegmentationImageProcessor(image_size=SIZE),
        split,
        episodes,
        class_ids=fold.novel,
        progress=False,
        feature_cache=cache,
        batch_size=batch_size,
    )


@pytest.mark.parametrize("shot", [1, 2])
def test_cached_metrics_are_bit_identical(split, shot):
    episodes = make_test_episodes(split, fold_classes("synthetic", 0).novel, 24, shot, seed=3)
    distinct = {i for e in episodes for i in (e.query, *e.supports)}
    for name, model in _models().items():
        plain = _evaluate(model, split, episodes)
        cache = FeatureCache(1 << 30)
        cached = _evaluate(model, split, episodes, cache)
        again = _evaluate(model, split, episodes, cache)  # a second seed's run over the same images: all hits
        assert json.dumps(cached, sort_keys=True) == json.dumps(plain, sort_keys=True), name
        assert json.dumps(again, sort_keys=True) == json.dumps(plain, sort_keys=True), name
        # One support encoding per distinct (support image, class); one extractor pass per distinct image; everything
        # else, and the whole second run, served. The extractor is asked for a support image only when its encoding
        # is computed (a support-cache miss), and for a query image every episode, or only when its query encoding
        # is computed for a method that has one (NTRENet, QGNet).
        pairs = {(i, e.class_id) for e in episodes for i in e.supports}
        queries = {e.query for e in episodes}
        query_encoded = isinstance(model, NTRENetModel)
        query_calls = len(queries) if query_encoded else 2 * len(episodes)
        assert cache.support_misses == len(pairs), name
        assert cache.support_hits == 2 * len(episodes) * shot - len(pairs), name
        assert cache.query_misses == (len(queries) if query_encoded else 0), name
        assert cache.misses == len(distinct), name
        assert cache.hits == query_calls + len(pairs) - len(distinct), name


def test_small_cache_evicts_and_stays_identical(split):
    episodes = make_test_episodes(split, fold_classes("synthetic", 0).novel, 20, 1, seed=5)
    model = _models()["ntrenet"]
    plain = _evaluate(model, split, episodes)
    probe = FeatureCache(1 << 30)
    _evaluate(model, split, episodes[:1], probe)
    one_episode = probe.bytes  # features, support encoding, decoded images and mask of one episode
    unbounded = FeatureCache(1 << 30)
    _evaluate(model, split, episodes, unbounded)
    cache = FeatureCache(2 * one_episode)
    cached = _evaluate(model, split, episodes, cache)
    assert json.dumps(cached, sort_keys=True) == json.dumps(plain, sort_keys=True)
    # Entries of both kinds share the bound; the least recently used were evicted.
    assert len(cache) < len(unbounded) and cache.bytes <= cache.max_bytes


def test_copies_changed_weights_and_in_place_edits_are_not_served():
    model = _models()["cosine_prior"].eval()
    cache = FeatureCache(1 << 30)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad(), cache.attach(model):
        with cache.images([(x, ["a", "b"])]):
            first = model.backbone.forward_stages(x, 0, 5)
            assert cache.misses == 2 and cache.hits == 0
            again = model.backbone.forward_stages(x, 0, 5)
            assert cache.hits == 2 and all(torch.equal(u, v) for u, v in zip(first, again))
            twin = copy.deepcopy(model.backbone)  # e.g. test-time adaptation's copy: computes itself
            twin.forward_stages(x, 0, 5)
            assert (cache.hits, cache.misses) == (2, 2)
            # A row that is not registered (a copy of the input the model made) is computed, not looked up.
            model.backbone.forward_stages(x.clone(), 0, 5)
            assert (cache.hits, cache.misses) == (2, 2)
        one = x[:1]
        with cache.images([(one, ["a"])]):
            served = model.backbone.forward_stages(one, 0, 3)
            assert cache.hits == 3
            served[2].mul_(0)  # the model edits a served feature in place: the entry is dropped, not served again
            fresh = model.backbone.forward_stages(one, 0, 3)
            assert cache.misses == 3 and torch.allclose(fresh[1], first[1][:1], atol=1e-5)
            with torch.no_grad():
                model.backbone.layer4[0].conv1.weight.add_(1.0)  # changed weights: recomputed
            model.backbone.forward_stages(one, 0, 5)
            assert cache.misses == 4
    assert model.backbone.feature_cache is None  # detached after the block


def test_evaluate_script_cache_flag(tmp_path, capsys):
    """scripts/evaluate.py: the default (cache on) and --feature-cache-mb 0 write the same metrics."""
    from hf_fss.evaluation.runner import main

    model = _models()["ntrenet"]
    model.save_pretrained(tmp_path / "model")
    FewShotSegmentationImageProcessor(image_size=SIZE).save_pretrained(tmp_path / "model")
    flags = ["--model", str(tmp_path / "model"), "--dataset", "synthetic", "--synthetic-num-train", "0",
             "--synthetic-num-val", "60", "--synthetic-image-size", "128", "--num-episodes", "12", "--seeds", "1", "2",
             "--num-threads", "1"]  # fmt: skip
    assert main([*flags, "--output", str(tmp_path / "on.json")]) == 0
    assert "feature cache:" in capsys.readouterr().out
    assert main([*flags, "--feature-cache-mb", "0", "--output", str(tmp_path / "off.json")]) == 0
    assert "feature cache:" not in capsys.readouterr().out
    assert (tmp_path / "on.json").read_text() == (tmp_path / "off.json").read_text().replace("off.json", "on.json")
    assert main([*flags, "--feature-cache-mb", "-1", "--output", str(tmp_path / "x.json")]) == 2


def test_every_extractor_of_the_model_is_served_under_its_own_name():
    """A second extractor (QGNet's prior extractor) is attached too, with entries apart from the backbone's."""
    from hf_fss.backbones import build_backbone

    model = _models()["cosine_prior"].eval()
    model.prior_extractor = build_backbone("resnet50", **TINY_RESNET).freeze()
    assert sorted(model.feature_extractors()) == ["backbone", "prior_extractor"]
    cache = FeatureCache(1 << 30)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad(), cache.attach(model), cache.images([(x, ["a"])]):
        for _ in range(2):
            backbone = model.backbone.forward_stages(x, 0, 5)
            prior = model.prior_extractor.forward_stages(x, 0, 5)
    assert (cache.misses, cache.hits, len(cache)) == (2, 2, 2)
    assert not torch.equal(backbone[-1], prior[-1])  # distinct weights, distinct entries
    assert model.prior_extractor.feature_cache is None and model.backbone.feature_cache is None
