"""Tests for the shared building blocks in `hf_fss.modules`; expected values are worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_fss.modules import (
    ASPPBranch,
    ASPPClassifier,
    FeatureEnrichmentModule,
    average_prototypes,
    cosine_prior_mask,
    masked_average_pooling,
    multi_shot_prior_mask,
    resize_mask,
)

# --------------------------------------------------------------------------------------------------------------------
# masked average pooling / resize


def test_masked_average_pooling_area_epsilon():
    features = torch.ones(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1.0  # area 4
    prototype = masked_average_pooling(features, mask)
    assert prototype.shape == (1, 3, 1, 1)
    torch.testing.assert_close(prototype, torch.full((1, 3, 1, 1), 4 / 4.0005))


def test_masked_average_pooling_soft_mask():
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    # channel 0: (1 * 1 + 3 * 0.5) / (1.5 + 0.0005); channel 1: (10 + 15) / 1.5005
    expected = torch.tensor([2.5 / 1.5005, 25.0 / 1.5005]).view(1, 2, 1, 1)
    torch.testing.assert_close(masked_average_pooling(features, mask), expected)
    # a custom epsilon (SMCP uses 1e-5)
    torch.testing.assert_close(
        masked_average_pooling(features, mask, eps=1e-5), torch.tensor([2.5, 25.0]).view(1, 2, 1, 1) / 1.50001
    )


def test_masked_average_pooling_empty_mask_is_zero():
    features = torch.randn(2, 5, 4, 4)
    prototype = masked_average_pooling(features, torch.zeros(2, 1, 4, 4))
    assert torch.isfinite(prototype).all()
    assert torch.equal(prototype, torch.zeros(2, 5, 1, 1))


def test_masked_average_pooling_shot_dimension():
    features = torch.randn(2, 3, 4, 6, 6)
    mask = (torch.rand(2, 3, 1, 6, 6) > 0.5).float()
    prototypes = masked_average_pooling(features, mask)
    assert prototypes.shape == (2, 3, 4, 1, 1)
    torch.testing.assert_close(prototypes[:, 1], masked_average_pooling(features[:, 1], mask[:, 1]))


def test_masked_average_pooling_size_mismatch():
    with pytest.raises(ValueError):
        masked_average_pooling(torch.ones(1, 2, 4, 4), torch.ones(1, 1, 8, 8))


def test_resize_mask_align_corners():
    mask = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    # align_corners=True keeps the corners and puts the new middle column half-way
    expected = torch.tensor([[[[0.0, 0.5, 1.0]] * 3]])
    torch.testing.assert_close(resize_mask(mask, 3), expected)
    torch.testing.assert_close(resize_mask(mask, (3, 3)), expected)
    assert resize_mask(mask.view(1, 1, 1, 2, 2), (3, 3)).shape == (1, 1, 1, 3, 3)
    assert resize_mask(mask, (2, 2)) is mask


# --------------------------------------------------------------------------------------------------------------------
# prior masks


def test_prior_mask_matching_and_orthogonal_positions():
    channels = 3
    support = torch.zeros(1, channels, 4, 4)
    support[:, 1] = 1.0  # outside the mask: along channel 1, must be masked away
    support[:, :, :2, :2] = 0.0
    support[:, 0, :2, :2] = 1.0  # inside the mask: channel-0 direction
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :4] = 1.0  # resized (align_corners=True) to the 4x4 support features: exactly the top-left 2x2

    query = torch.zeros(1, channels, 4, 4)
    query[:, 1] = 3.0  # orthogonal to the masked support (but equal to its unmasked background)
    matching = torch.zeros(4, 4, dtype=torch.bool)
    matching[0, 0] = matching[2, 3] = matching[3, 1] = True
    query[0, :, matching] = torch.tensor([2.0, 0.0, 0.0]).view(3, 1)

    prior = cosine_prior_mask(query, support, mask)
    assert prior.shape == (1, 1, 4, 4)
    assert prior.min() >= 0 and prior.max() <= 1
    torch.testing.assert_close(prior[0, 0], matching.float(), atol=1e-5, rtol=0)


def test_prior_mask_min_max_normalisation_by_hand():
    # support: two positions (1x2 features), only the first is foreground
    support = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # s1 = (1, 0), s2 = (0, 1)
    mask = torch.tensor([[[[1.0, 0.0]]]])
    # query: three positions (1x3 features)
    query = torch.tensor([[[[3.0, 4.0, 1.0]], [[4.0, 3.0, 1.0]]]])  # (3, 4), (4, 3), (1, 1)
    # cosine with s1: 3/5 = 0.6, 4/5 = 0.8, 1/sqrt(2); s2 is masked out (else (3, 4) would reach 0.8)
    # min-max: (0.6 - 0.6) / 0.2 = 0, (0.8 - 0.6) / 0.2 = 1, (1/sqrt(2) - 0.6) / 0.2
    expected = torch.tensor([[[[0.0, 1.0, (1 / math.sqrt(2) - 0.6) / 0.2]]]])
    prior = cosine_prior_mask(query, support, mask)
    torch.testing.assert_close(prior, expected, atol=1e-5, rtol=0)

    # output_size resizes with align_corners=True, which keeps the end values
    resized = cosine_prior_mask(query, support, mask, output_size=(2, 5))
    assert resized.shape == (1, 1, 2, 5)
    torch.testing.assert_close(resized[0, 0, :, 0], torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(resized[0, 0, :, 2], torch.ones(2), atol=1e-5, rtol=0)


def test_prior_mask_empty_support_mask_is_zero():
    prior = cosine_prior_mask(torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5), torch.zeros(2, 1, 20, 20))
    assert torch.isfinite(prior).all()
    assert torch.equal(prior, torch.zeros(2, 1, 5, 5))


def test_prior_mask_large_feature_map():
    # 60x60 features: one batched (3600 x 3600) similarity per image
    query, support = torch.randn(2, 8, 60, 60), torch.randn(2, 8, 60, 60)
    mask = (torch.rand(2, 1, 473, 473) > 0.5).float()
    prior = cosine_prior_mask(query, support, mask)
    assert prior.shape == (2, 1, 60, 60)
    flat = prior.flatten(1)
    torch.testing.assert_close(flat.min(1).values, torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.max(1).values, torch.ones(2), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# K-shot fusion


def test_multi_shot_prior_mask():
    query = torch.randn(2, 8, 6, 6)
    support = torch.randn(2, 3, 8, 6, 6)
    masks = (torch.rand(2, 3, 1, 24, 24) > 0.5).float()

    single = cosine_prior_mask(query, support[:, 0], masks[:, 0])
    torch.testing.assert_close(multi_shot_prior_mask(query, support[:, :1], masks[:, :1]), single)
    # five identical shots average to the single-shot prior
    five = multi_shot_prior_mask(
        query, support[:, :1].expand(-1, 5, -1, -1, -1), masks[:, :1].expand(-1, 5, -1, -1, -1)
    )
    torch.testing.assert_close(five, single)
    # different shots: the mean of the per-shot priors, each resized to output_size first
    priors = [cosine_prior_mask(query, support[:, k], masks[:, k], output_size=(11, 11)) for k in range(3)]
    fused = multi_shot_prior_mask(query, support, masks, output_size=(11, 11))
    assert fused.shape == (2, 1, 11, 11)
    torch.testing.assert_close(fused, (priors[0] + priors[1] + priors[2]) / 3)
    # lists and masks without the channel dimension are accepted too
    from_lists = multi_shot_prior_mask(query, list(support.unbind(1)), list(masks.unbind(1)), output_size=(11, 11))
    torch.testing.assert_close(from_lists, fused)
    torch.testing.assert_close(multi_shot_prior_mask(query, support, masks[:, :, 0], output_size=(11, 11)), fused)
    with pytest.raises(ValueError):
        multi_shot_prior_mask(query, support, masks[:, :2])


def test_average_prototypes():
    prototype = torch.randn(2, 4, 1, 1)
    torch.testing.assert_close(average_prototypes(prototype.unsqueeze(1)), prototype)
    torch.testing.assert_close(average_prototypes(prototype.unsqueeze(1).expand(-1, 5, -1, -1, -1)), prototype)
    shots = torch.tensor([1.0, 3.0, 8.0]).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(average_prototypes(shots), torch.full((1, 1, 1, 1), 4.0))
    torch.testing.assert_close(average_prototypes(list(shots.unbind(1))), torch.full((1, 1, 1, 1), 4.0))


# --------------------------------------------------------------------------------------------------------------------
# Feature Enrichment Module


def _fem_inputs(batch_size, shot, reduce_dim=16, size=(60, 60), high_dim=12):
    height, width = size
    query = torch.randn(batch_size, reduce_dim, height, width)
    support = torch.randn(batch_size, shot, reduce_dim, height, width)
    query_high = torch.randn(batch_size, high_dim, height, width)
    support_high = torch.randn(batch_size, shot, high_dim, height, width)
    masks = (torch.rand(batch_size, shot, 1, 2 * height, 2 * width) > 0.5).float()

    prototypes = masked_average_pooling(support, resize_mask(masks, (height, width)))
    assert prototypes.shape == (batch_size, shot, reduce_dim, 1, 1)
    prototype = average_prototypes(prototypes)
    prior = multi_shot_prior_mask(query_high, support_high, masks)
    return query, prototype, prior


@pytest.mark.parametrize("shot", [1, 5])
def test_fem_shapes(shot):
    torch.manual_seed(0)
    fem = FeatureEnrichmentModule(reduce_dim=16, pyramid_bins=(60, 30, 15, 8)).eval()
    batch_size = 2 if shot == 1 else 1  # five 3600 x 3600 similarity maps per image are slow on a CPU
    query, prototype, prior = _fem_inputs(batch_size, shot)
    assert prototype.shape == (batch_size, 16, 1, 1) and prior.shape == (batch_size, 1, 60, 60)
    with torch.no_grad():
        logits, aux = fem(query, prototype, prior)
    assert logits.shape == (batch_size, 2, 60, 60)
    assert [tuple(a.shape) for a in aux] == [(batch_size, 2, b, b) for b in (60, 30, 15, 8)]


def test_fem_fractional_bins():
    fem = FeatureEnrichmentModule(reduce_dim=16, pyramid_bins=(1.0, 0.5, 0.25, 0.125)).eval()
    assert fem.pyramid_sizes(60, 60) == [(60, 60), (30, 30), (15, 15), (7, 7)]
    query, prototype, prior = _fem_inputs(1, 1)
    with torch.no_grad():
        logits, aux = fem(query, prototype, prior)
    assert logits.shape == (1, 2, 60, 60)
    assert [tuple(a.shape) for a in aux] == [(1, 2, 60, 60), (1, 2, 30, 30), (1, 2, 15, 15), (1, 2, 7, 7)]

    # non-square features: a fraction scales each side, a fixed bin stays square
    fem = FeatureEnrichmentModule(reduce_dim=16, pyramid_bins=(1.0, 0.5, 6)).eval()
    query, prototype, prior = _fem_inputs(1, 2, size=(20, 30))
    with torch.no_grad():
        logits, aux = fem(query, prototype, prior)
    assert logits.shape == (1, 2, 20, 30)
    assert [tuple(a.shape[-2:]) for a in aux] == [(20, 30), (10, 15), (6, 6)]


def test_fem_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    fem = FeatureEnrichmentModule(reduce_dim=16, pyramid_bins=(30, 15, 8, 4)).train()
    query, prototype, prior = _fem_inputs(2, 1, size=(30, 30))
    logits, aux = fem(query, prototype, prior)
    loss = logits.square().mean() + sum(a.square().mean() for a in aux)
    loss.backward()
    for name, parameter in fem.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_fem_extra_channels():
    query, prototype, prior = _fem_inputs(1, 1, size=(16, 16))
    extra = torch.randn(1, 3, 16, 16)
    for mode in ("bilinear", "adaptive_avg"):
        fem = FeatureEnrichmentModule(reduce_dim=16, pyramid_bins=(16, 8, 4), extra_channels=3, extra_resize=mode)
        assert fem.init_merge[0][0].weight.shape == (16, 16 * 2 + 1 + 3, 1, 1)
        logits, aux = fem.eval()(query, prototype, prior, extra)
        assert logits.shape == (1, 2, 16, 16) and len(aux) == 3
        with pytest.raises(ValueError):
            fem(query, prototype, prior)
    with pytest.raises(ValueError):
        FeatureEnrichmentModule(reduce_dim=16)(query, prototype, prior, extra)


def test_fem_state_dict_matches_pfenet_layout():
    fem = FeatureEnrichmentModule(reduce_dim=16, pyramid_bins=(60, 30, 15, 8), num_classes=2)
    state = fem.state_dict()
    for key in (
        "init_merge.0.0.weight",
        "beta_conv.0.2.weight",
        "inner_cls.0.3.bias",
        "res2.2.weight",
        "cls.3.weight",
        "alpha_conv.0.0.weight",
    ):
        assert key in state, key

    # the full key set of PFENet's FEM part, spelled out
    expected = set()
    for i in range(4):
        expected |= {f"init_merge.{i}.0.weight", f"beta_conv.{i}.0.weight", f"beta_conv.{i}.2.weight"}
        expected |= {f"inner_cls.{i}.0.weight", f"inner_cls.{i}.3.weight", f"inner_cls.{i}.3.bias"}
    expected |= {f"alpha_conv.{i}.0.weight" for i in range(3)}
    expected |= {"res1.0.weight", "res2.0.weight", "res2.2.weight", "cls.0.weight", "cls.3.weight", "cls.3.bias"}
    assert set(state) == expected

    assert state["init_merge.0.0.weight"].shape == (16, 33, 1, 1)
    assert state["alpha_conv.2.0.weight"].shape == (16, 32, 1, 1)
    assert state["beta_conv.3.2.weight"].shape == (16, 16, 3, 3)
    assert state["inner_cls.1.3.weight"].shape == (2, 16, 1, 1)
    assert state["res1.0.weight"].shape == (16, 64, 1, 1)
    assert state["cls.3.bias"].shape == (2,)


def test_fem_pieces_without_init_merge():
    # how a variant with its own per-scale merge (NTRENet) drives the shared pyramid
    fem = FeatureEnrichmentModule(reduce_dim=8, pyramid_bins=(12, 6), use_init_merge=False).eval()
    assert not any(key.startswith("init_merge") for key in fem.state_dict())
    with pytest.raises(RuntimeError):
        fem(torch.randn(1, 8, 12, 12), torch.randn(1, 8, 1, 1), torch.rand(1, 1, 12, 12))
    features = []
    for index, size in enumerate(fem.pyramid_sizes(12, 12)):
        merged = torch.randn(1, 8, *size)
        merged, aux = fem.refine_scale(index, merged, features[-1] if features else None)
        assert merged.shape == (1, 8, *size) and aux.shape == (1, 2, *size)
        features.append(F.interpolate(merged, size=(12, 12), mode="bilinear", align_corners=True))
    assert fem.fuse(features).shape == (1, 2, 12, 12)
    with pytest.raises(ValueError):
        fem.refine_scale(1, torch.randn(1, 8, 6, 6))


# --------------------------------------------------------------------------------------------------------------------
# ASPP


def test_aspp_sums_dilated_branches_by_hand():
    aspp = ASPPClassifier(1, 1, rates=(6, 12, 18, 24))
    with torch.no_grad():
        for conv in aspp.conv2d_list:
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0  # centre tap only: every branch is the identity
            conv.bias.fill_(0.25)
    x = torch.randn(2, 1, 9, 11)
    # four identity branches plus four biases of 0.25
    torch.testing.assert_close(aspp(x), 4 * x + 1.0)

    with torch.no_grad():
        aspp.conv2d_list[2].weight[0, 0, 0, 0] = 2.0  # top-left tap of the rate-18 branch
    # that tap reads x[i - 18, j - 18], which is padding (zero) everywhere on a 9x11 map
    torch.testing.assert_close(aspp(x), 4 * x + 1.0)


def test_aspp_matches_sum_of_single_convs():
    torch.manual_seed(0)
    aspp = ASPPClassifier(8, 3)
    x = torch.randn(2, 8, 41, 41)
    out = aspp(x)
    assert out.shape == (2, 3, 41, 41)
    expected = sum(
        F.conv2d(x, conv.weight, conv.bias, padding=rate, dilation=rate)
        for conv, rate in zip(aspp.conv2d_list, (6, 12, 18, 24))
    )
    torch.testing.assert_close(out, expected)
    # a single-rate ASPP is just that convolution
    single = ASPPClassifier(8, 3, rates=(12,))
    conv = single.conv2d_list[0]
    torch.testing.assert_close(single(x), F.conv2d(x, conv.weight, conv.bias, padding=12, dilation=12))


def test_aspp_keys_and_init():
    torch.manual_seed(0)
    aspp = ASPPClassifier(64, 21)
    assert set(aspp.state_dict()) == {f"conv2d_list.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    for conv, rate in zip(aspp.conv2d_list, (6, 12, 18, 24)):
        assert conv.dilation == (rate, rate) and conv.padding == (rate, rate) and conv.kernel_size == (3, 3)
        assert abs(conv.weight.std().item() - 0.01) < 5e-4
        assert abs(conv.weight.mean().item()) < 5e-4
        assert isinstance(conv, ASPPBranch)
    wide = ASPPClassifier(64, 21, init_std=0.05)
    assert all(abs(conv.weight.std().item() - 0.05) < 2.5e-3 for conv in wide.conv2d_list)


def test_aspp_init_survives_a_generic_conv_init():
    # the pattern a model's `_init_weights` should follow: ASPP branches before the generic Conv2d case
    aspp = ASPPClassifier(64, 21)
    for module in aspp.modules():
        if isinstance(module, ASPPBranch):
            module.reset_parameters()
        elif isinstance(module, torch.nn.Conv2d):
            raise AssertionError("every ASPP convolution is an ASPPBranch")
    assert all(abs(conv.weight.std().item() - 0.01) < 5e-4 for conv in aspp.conv2d_list)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cosine_prior_of_layer4_sized_features_is_finite_in_reduced_precision(dtype):
    # 2048 channels of magnitude ~100 (a ResNet-50 layer4): the dot products reach ~2e7, beyond float16's 65504
    generator = torch.Generator().manual_seed(0)
    query, support = (100 * torch.rand(1, 2048, 6, 7, generator=generator) for _ in range(2))
    mask = torch.zeros(1, 1, 6, 7)
    mask[..., 2:4, 2:5] = 1
    full = cosine_prior_mask(query, support, mask)
    low = cosine_prior_mask(query.to(dtype), support.to(dtype), mask.to(dtype))
    assert low.dtype == dtype and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), full, rtol=0, atol=0.05)
