"""
hf_fss.pretraining: superpixels (computed once per image, SLIC and Felzenszwalb), MoCo v2 views and the two local
forms, InfoNCE, the ring-buffer key queue, split BN and Shuffle-BN on one process, Table VI's loss switches and the
momentum update. Tiny ResNets (base width 8, one block per stage) at 32-48 px.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RESNET
from torch import nn

from hf_fss.pretraining import (
    ContrastiveViews,
    GlobalLocalContrastiveModel,
    KeyQueue,
    PretrainingConfig,
    SplitBatchNorm,
    SuperpixelCache,
    SuperpixelSettings,
    info_nce,
    shuffled_forward,
)
from hf_fss.pretraining.data import PretrainingImages, load_unlabeled_images

TINY_BACKBONE = {"stem": "7x7", **TINY_RESNET}


@pytest.fixture(scope="module")
def images():
    return load_unlabeled_images("synthetic", num_train=6, num_val=2, image_size=64)[0]


@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
def test_superpixels_are_computed_once_per_image_and_cached_on_disk(images, method, tmp_path):
    settings = SuperpixelSettings(method=method, felzenszwalb_scale=50.0)
    cache = SuperpixelCache(settings, cache_dir=tmp_path)
    dataset = PretrainingImages(images, ContrastiveViews(size=32, local_form="patch"), cache, seed=1)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        items = [dataset[i] for i in range(len(dataset))]
    assert cache.computed == len(images) == 6  # two epochs, one computation per image
    assert items[0]["patch_pixel_values_q"].shape == (3, 32, 32)
    # A new process (empty memory) reads the disk cache instead of computing again.
    again = SuperpixelCache(settings, cache_dir=tmp_path)
    image = dataset.image(3)
    assert np.array_equal(again(image), cache(image)) and again.computed == 0
    labels = cache(image)
    assert labels.shape == image.shape[:2] and labels.max() >= 3  # several segments
    # Other settings never reuse these label maps.
    other = SuperpixelCache(SuperpixelSettings(method=method, min_area_fraction=0.05), cache_dir=tmp_path)
    other(image)
    assert other.computed == 1


def test_views_are_reproducible_and_pooled_masks_follow_the_crop(images):
    cache = SuperpixelCache(SuperpixelSettings())
    pooled = PretrainingImages(images, ContrastiveViews(size=40, local_form="pooled"), cache, seed=3)
    first, second = pooled[2], pooled[2]
    assert set(first) == {"pixel_values_q", "pixel_values_k", "patch_mask_q", "patch_mask_k"}
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first["patch_mask_q"].shape == (40, 40) and first["patch_mask_q"].sum() > 0
    pooled.set_epoch(1)
    assert not torch.equal(pooled[2]["pixel_values_q"], first["pixel_values_q"])
    plain = PretrainingImages(images, ContrastiveViews(size=40, local_form=None), None)
    assert set(plain[0]) == {"pixel_values_q", "pixel_values_k"}
    # The two views of an image differ (independent augmentations).
    assert not torch.equal(first["pixel_values_q"], first["pixel_values_k"])


def test_info_nce_has_the_positive_at_index_zero():
    g = torch.Generator().manual_seed(0)
    query, key, queue = (F.normalize(torch.randn(n, 8, generator=g), dim=1) for n in (4, 4, 16))
    loss, accuracy = info_nce(query, key, queue, 0.2)
    logits = torch.cat([(query * key).sum(1, keepdim=True), query @ queue.t()], 1) / 0.2
    assert torch.allclose(loss, -F.log_softmax(logits, 1)[:, 0].mean())
    _, perfect = info_nce(query, query, -query.repeat(4, 1), 0.2)
    assert perfect == 1.0 and 0.0 <= accuracy <= 1.0


def test_key_queue_is_a_ring_buffer_with_exact_state():
    queue = KeyQueue(size=5, dim=3, seed=4)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(5))
    initial = queue.keys.clone()
    queue.push_gathered(torch.zeros(3), torch.full((3, 3), 1.0))
    queue.push_gathered(torch.zeros(3), torch.full((3, 3), 2.0))  # wraps: rows 3, 4, then 0
    assert queue.pointer == 1
    assert torch.equal(queue.keys[[1, 2]], torch.ones(2, 3)) and torch.equal(
        queue.keys[[3, 4, 0]], torch.full((3, 3), 2.0)
    )
    restored = KeyQueue(size=5, dim=3, seed=9)
    restored.load_state_dict(copy.deepcopy(queue.state_dict()))
    assert torch.equal(restored.keys, queue.keys) and restored.pointer == 1
    queue.reset()
    assert torch.equal(queue.keys, initial) and queue.pointer == 0


def test_split_batchnorm_normalises_each_split_like_its_own_batch():
    x = torch.randn(8, 3, 4, 4)
    split = SplitBatchNorm(3, num_splits=4).train()
    out = split(x)
    plain = nn.BatchNorm2d(3).train()
    for j in range(4):  # split j holds samples j, j + 4
        assert torch.allclose(out[j::4], plain(x[j::4]), atol=1e-5)
    means = torch.stack([x[j::4].mean((0, 2, 3)) for j in range(4)]).mean(0)
    assert torch.allclose(split.running_mean, 0.1 * means, atol=1e-6)
    with pytest.raises(ValueError, match="bn_splits"):
        split(torch.randn(6, 3, 4, 4))
    # Same state-dict keys as BatchNorm2d: exported weights load into a plain backbone.
    assert split.state_dict().keys() == plain.state_dict().keys()


def test_shuffled_forward_returns_rows_in_the_original_order():
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    assert torch.equal(shuffled_forward(lambda t: t * 2, x), x * 2)


def _config(**kwargs):
    values = dict(backbone_kwargs=TINY_BACKBONE, queue_size=16, patch_queue_size=12, embedding_dim=8, bn_splits=2)
    return PretrainingConfig(**{**values, **kwargs})


def _batch(form, n=4, size=32):
    g = torch.Generator().manual_seed(1)
    batch = {
        "pixel_values_q": torch.randn(n, 3, size, size, generator=g),
        "pixel_values_k": torch.randn(n, 3, size, size, generator=g),
    }
    if form == "patch":
        batch.update(
            patch_pixel_values_q=torch.randn(n, 3, size, size, generator=g),
            patch_pixel_values_k=torch.randn(n, 3, size, size, generator=g),
        )
    else:
        masks = torch.zeros(n, size, size)
        masks[:, 4:20, 6:22] = 1
        batch.update(patch_mask_q=masks, patch_mask_k=masks.flip(-1))
    return batch


@pytest.mark.parametrize(
    "weights, form",
    [((1.0, 1.0), "patch"), ((1.0, 0.0), "patch"), ((0.0, 1.0), "patch"), ((1.0, 1.0), "pooled")],
    ids=["both", "global-only", "local-only", "both-pooled"],
)
def test_table_vi_switches_train_only_the_losses_in_use(weights, form):
    model = GlobalLocalContrastiveModel(_config(global_weight=weights[0], local_weight=weights[1], local_form=form))
    queues = {"queue": model.queue.keys.clone(), "patch_queue": model.patch_queue.keys.clone()}
    outputs = model(**_batch(form))
    used = {name for name, w in zip(("global", "local"), weights) if w > 0}
    assert set(outputs.losses) == used and torch.isfinite(outputs.loss)
    assert set(model.training_state_objects()) == {"queue" if u == "global" else "patch_queue" for u in used}
    for name, before in queues.items():
        changed = not torch.equal(getattr(model, name).keys, before)
        assert changed == (("global" if name == "queue" else "local") in used), name
    outputs.loss.backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())


def test_symmetric_loss_enqueues_both_directions():
    model = GlobalLocalContrastiveModel(_config(local_weight=0.0, symmetric=True))
    model(**_batch("patch"))
    assert model.queue.pointer == 8  # 2 x batch of 4


def test_momentum_update_moves_key_parameters_only():
    model = GlobalLocalContrastiveModel(_config(momentum=0.9))
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    key_before = copy.deepcopy(model.encoder_k.state_dict())
    model.momentum_update()
    for name, value in model.encoder_k.named_parameters():
        query = dict(model.encoder_q.named_parameters())[name]
        assert torch.allclose(value, 0.9 * key_before[name] + 0.1 * query)
    for name, value in model.encoder_k.named_buffers():  # BN statistics are not averaged
        assert torch.equal(value, key_before[name])
    with pytest.raises(ValueError, match="not both 0"):
        _config(global_weight=0.0, local_weight=0.0)
