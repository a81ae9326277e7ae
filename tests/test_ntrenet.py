"""NTRENet: outputs, losses, the contrastive bank, support encoding, input checks and the official-checkpoint converter."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_DINOV2, TINY_HF_RESNET, TINY_RESNET, random_episode
from huggingface_hub.errors import StrictDataclassError
from modeling_common import FewShotModelTesterMixin
from safetensors import safe_open
from transformers import AutoConfig, AutoModel

import hf_fss
from hf_fss import FewShotSegmentationImageProcessor, NTRENetConfig, NTRENetModel
from hf_fss.models.ntrenet import NTRENetContrastiveBank, modeling_ntrenet
from hf_fss.models.ntrenet.convert_ntrenet import (
    convert_ntrenet_checkpoint,
    convert_ntrenet_state_dict,
    infer_ntrenet_config,
    original_key_to_ours,
    our_key_to_original,
)
from hf_fss.modules import memory_bank

ROOT = Path(__file__).resolve().parents[1]
TINY = {"reduce_dim": 16, "background_prototype_dim": 24, "pyramid_bins": (9, 4, 2, 1), "image_size": 65}


def tiny_model(backbone="resnet50", backbone_kwargs=None, **kwargs) -> NTRENetModel:
    options = {**TINY, **kwargs}
    config = NTRENetConfig(backbone=backbone, backbone_kwargs=backbone_kwargs or dict(TINY_RESNET), **options)
    model = NTRENetModel(config)
    with torch.no_grad():  # a non-zero BG prototype, so that it matters in every comparison
        model.bg_prototype.normal_()
    return model.eval()


pytestmark = pytest.mark.usefixtures("no_onednn")  # conftest: native conv kernels, cheaper for tiny convs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model()


def _randomise_batchnorm(module, generator):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.1, generator=generator)
                m.running_mean.normal_(0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)


# --- configuration ---------------------------------------------------------------------------------------------------
def test_config_defaults_follow_the_official_code_and_validate():
    config = NTRENetConfig()
    assert config.model_type == "ntrenet"
    assert (config.reduce_dim, config.background_prototype_dim, config.pyramid_bins) == (256, 256, (60, 30, 15, 8))
    assert config.distractor_pooling == "global_average" and config.background_prototype_init_std == 0.0
    assert (config.final_aux_loss_weight, config.initial_aux_loss_weight, config.contrastive_loss_weight) == (
        0.4,
        0.6,
        0.01,
    )
    assert (config.contrastive_bank_size, config.contrastive_num_negatives) == (2000, 1000)
    for bad in (
        {"backbone": "vgg16_dilated"},
        {"distractor_pooling": "max"},
        {"pyramid_bins": ()},
        {"pyramid_bins": (60, 2.5)},
        {"reduce_dim": 0},
        {"shot_fusion": "attention"},
        {"feature_dropout": 1.0},
    ):
        with pytest.raises(StrictDataclassError, match=next(iter(bad))):
            NTRENetConfig(**bad)


# --- forward, save / load ------------------------------------------------------------------------------------------
def test_outputs_maps_and_k_shot(model):
    for shot in (1, 5):
        query, support, masks, _ = random_episode(batch_size=2, shot=shot)
        with torch.no_grad():
            out = model(query, support, masks)
        assert out.logits.shape == (2, 2, 65, 65) and torch.isfinite(out.logits).all()
        assert out.loss is None and out.losses is None and out.support_logits is None
        assert set(out.maps) == {"prior", "background", "distractor", "initial_target"}
        for value in out.maps.values():
            assert value.shape == (2, 1, 9, 9)
            assert value.min() >= 0 and value.max() <= 1


def test_save_load_round_trip_keeps_logits_and_leaves_the_bank_out(tmp_path, model):
    query, support, masks, labels = random_episode(batch_size=2, shot=2)
    model.train()
    model(query, support, masks, labels=labels, class_ids=torch.tensor([1, 2]))  # fill the bank
    model.eval()
    assert len(model.contrastive_bank) > 0
    assert not [k for k in model.state_dict() if "bank" in k or "contrast" in k]

    model.save_pretrained(tmp_path)
    FewShotSegmentationImageProcessor(image_size=65).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "ntrenet"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    assert saved == set(model.state_dict()) and "bg_prototype" in saved
    assert not [k for k in saved if "bank" in k or "contrast" in k]

    assert type(AutoConfig.from_pretrained(tmp_path)) is NTRENetConfig
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is NTRENetModel and len(loaded.contrastive_bank) == 0
    torch.testing.assert_close(loaded.bg_prototype, model.bg_prototype, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(query, support, masks).logits, model(query, support, masks).logits, rtol=0, atol=0
        )


def test_encode_support_then_support_encoding_equals_the_plain_call(model):
    for shot in (1, 5):
        query, support, masks, _ = random_episode(batch_size=2, shot=shot)
        with torch.no_grad():
            plain = model(query, support, masks)
            encoding = model.encode_support(support, masks)
            assert isinstance(encoding, hf_fss.models.ntrenet.NTRENetSupportEncoding) and encoding.shot == shot
            reused = model(query, support_encoding=encoding)
        torch.testing.assert_close(reused.logits, plain.logits, rtol=0, atol=0)
        for name in plain.maps:
            torch.testing.assert_close(reused.maps[name], plain.maps[name], rtol=0, atol=0)
    # one support set (batch 1) for several queries
    with torch.no_grad():
        one = model.encode_support(support[:1], masks[:1])
        broadcast = model(query, support_encoding=one).logits
        each = model(query, support[:1].expand(2, -1, -1, -1, -1), masks[:1].expand(2, -1, -1, -1)).logits
    torch.testing.assert_close(broadcast, each, rtol=1e-5, atol=1e-5)


def test_distractor_pooling_options_and_background_prototype_init():
    torch.manual_seed(0)
    code = tiny_model()
    with torch.no_grad():  # sharper heads, so the DO mask is neither empty nor everywhere and pooling matters
        for head in [*code.initial_inner_cls, code.bg_cls]:
            head[-1].weight.mul_(30)
    paper = tiny_model(distractor_pooling="masked_average")
    paper.load_state_dict(code.state_dict())
    query, support, masks, _ = random_episode()
    with torch.no_grad():
        assert 0 < code(query, support, masks).maps["distractor"].mean() < 1
        assert not torch.equal(code(query, support, masks).logits, paper(query, support, masks).logits)
    zeros = NTRENetModel(NTRENetConfig(backbone_kwargs=dict(TINY_RESNET), **TINY))
    assert torch.count_nonzero(zeros.bg_prototype) == 0
    normal = NTRENetModel(NTRENetConfig(backbone_kwargs=dict(TINY_RESNET), background_prototype_init_std=1.0, **TINY))
    assert normal.bg_prototype.std() > 0.5


# --- training ------------------------------------------------------------------------------------------------------
def test_training_step_gives_a_finite_loss_and_gradients_on_every_trainable_parameter():
    torch.manual_seed(0)
    model = tiny_model()
    _randomise_batchnorm(model.backbone, torch.Generator().manual_seed(1))
    running_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    assert not model.backbone.training  # frozen backbone BN stays in eval
    query, support, masks, labels = random_episode(batch_size=2, shot=2)
    out = model(query, support, masks, labels=labels, class_ids=torch.tensor([3, 7]))
    assert set(out.losses) == {"main", "aux_final", "aux_initial", "background", "contrastive"}
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) and not v.requires_grad for v in out.losses.values())
    config = model.config
    expected = (
        out.losses["main"]
        + config.background_loss_weight * out.losses["background"]
        + config.final_aux_loss_weight * out.losses["aux_final"]
        + config.initial_aux_loss_weight * out.losses["aux_initial"]
        + config.contrastive_loss_weight * out.losses["contrastive"]
    )
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not [n for n, p in trainable if n.startswith("backbone.")]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert model.bg_prototype.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, running_before[key], rtol=0, atol=0)


def test_training_without_class_ids_skips_the_contrastive_term():
    torch.manual_seed(0)
    model = tiny_model().train()
    query, support, masks, labels = random_episode(batch_size=2, shot=1)
    out = model(query, support, masks, labels=labels)
    assert "contrastive" not in out.losses and torch.isfinite(out.loss)
    assert len(model.contrastive_bank) == 0
    with pytest.raises(ValueError, match="class_ids"):
        model(query, support, masks, labels=labels, class_ids=torch.tensor([1, 2, 3]))
    # evaluation with labels: losses, but the bank (training state) is left alone
    model.eval()
    with torch.no_grad():
        out = model(query, support, masks, labels=labels, class_ids=torch.tensor([1, 2]))
    assert "contrastive" not in out.losses and len(model.contrastive_bank) == 0


def test_background_mining_loss_matches_eq3():
    logits = torch.randn(2, 2, 5, 5)
    target = torch.zeros(2, 5, 5, dtype=torch.bool)
    target[0, 1:3, 1:3] = True
    p_bg = logits.softmax(1)[:, 1]
    first = [-(torch.log(1 - p_bg[i])[target[i]]).sum() / (target[i].sum() + 1e-5) for i in range(2)]
    expected = torch.stack(first).mean() + 0.5 * (-torch.log(p_bg).mean())
    got = modeling_ntrenet.background_mining_loss(logits, target, alpha=0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --- the contrastive bank ------------------------------------------------------------------------------------------
def test_bank_fills_caps_and_keeps_the_newest_first():
    torch.manual_seed(0)
    model = tiny_model(contrastive_bank_size=5, contrastive_num_negatives=3).train()
    bank = model.contrastive_bank
    query, support, masks, labels = random_episode(batch_size=2, shot=2)
    class_ids = torch.tensor([4, 4])
    model(query, support, masks, labels=labels, class_ids=class_ids)
    assert bank.num_entries(4) == 5  # 2 queries + 4 supports, capped at 5
    first = bank.prototypes[4].clone()
    model(query, support, masks, labels=labels, class_ids=torch.tensor([4, 9]))
    assert bank.num_entries(4) == 5 and bank.num_entries(9) == 3
    # newest first: the query of this step, its two supports, then the two newest old entries
    torch.testing.assert_close(bank.prototypes[4][3:], first[:2])
    negatives = bank.draw_negatives(torch.tensor([4, 9]), 0, 2)
    assert [n.shape[0] for n in negatives] == [3, 3]


def test_bank_state_dict_round_trip_resumes_identically():
    bank = NTRENetContrastiveBank(size=6, num_negatives=2, seed=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        bank.step(
            torch.tensor([1, 2]), torch.randn(2, 4, generator=generator), torch.randn(2, 1, 4, generator=generator)
        )
    state = bank.state_dict()
    assert torch.is_tensor(state["generator_state"]) and len(state["rows"]) == 2
    restored = NTRENetContrastiveBank()
    restored.load_state_dict(state)
    assert (restored.size, restored.num_negatives, restored.seed) == (6, 2, 3)
    batch = (torch.tensor([1, 1]), torch.randn(2, 4, generator=generator), torch.randn(2, 1, 4, generator=generator))
    for a, b in zip(bank.step(*batch), restored.step(*batch)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bank.reset()
    assert len(bank) == 0


def test_bank_stays_identical_across_processes(monkeypatch):
    # Two "processes" with different local batches: the gather returns everyone's rows in rank order.
    generator = torch.Generator().manual_seed(0)
    local = [
        (torch.tensor([1, 2]), torch.randn(2, 4, generator=generator), torch.randn(2, 2, 4, generator=generator)),
        (torch.tensor([1]), torch.randn(1, 4, generator=generator), torch.randn(1, 2, 4, generator=generator)),
    ]
    banks = [NTRENetContrastiveBank(size=5, num_negatives=2, seed=0) for _ in range(2)]
    single = NTRENetContrastiveBank(size=5, num_negatives=2, seed=0)

    def rows(class_ids, queries, supports):
        return torch.cat([class_ids.float().unsqueeze(1), queries, supports.flatten(1)], dim=1)

    everything = torch.cat([rows(*batch) for batch in local])
    negatives = []
    for _ in range(3):
        for rank, bank in enumerate(banks):
            offset = 0 if rank == 0 else 2
            monkeypatch.setattr(memory_bank, "gather_rows", lambda r, o=offset: (everything, o))
            negatives.append(bank.step(*local[rank]))
        monkeypatch.setattr(memory_bank, "gather_rows", lambda r: (r, 0))
        merged = tuple(torch.cat([b[i] for b in local]) for i in range(3))
        expected = single.step(*merged)
        for a, b in zip(negatives[-2] + negatives[-1], expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(banks[0].state_dict()["rows"], banks[1].state_dict()["rows"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(banks[0].generator.get_state(), banks[1].generator.get_state())


# --- input checks --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, q, s, k: m(q[0], s, k), "pixel_values must be"),
        (lambda m, q, s, k: m(q, s[:, 0], k), "support_pixel_values must be"),
        (lambda m, q, s, k: m(q, s, k[:, :1]), "disagree on batch size or shot"),
        (lambda m, q, s, k: m(q, s, k[..., :-1]), "differs from the support image size"),
        (lambda m, q, s, k: m(q[:1], s, k), "support sets but pixel_values holds"),
        (lambda m, q, s, k: m(q, s, torch.zeros_like(k)), "no target pixel"),
        (lambda m, q, s, k: m(q, s, k, labels=torch.zeros(2, 64, 64, dtype=torch.long)), "labels must have shape"),
        (lambda m, q, s, k: m(q, support_encoding=(s, k)), "support_encoding must come from"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(model, call, message):
    query, support, masks, _ = random_episode(batch_size=2, shot=2)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        call(model, query, support, masks)


# --- converter -----------------------------------------------------------------------------------------------------
def _official_checkpoint(model: NTRENetModel, vgg: bool) -> dict:
    """Our weights in the official layout, as train.py saves them around a DataParallel model."""
    state = {f"module.{our_key_to_original(k, vgg)}": v.clone() for k, v in model.state_dict().items()}
    return {"epoch": 3, "state_dict": state}


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16_bn"])
def test_converter_round_trips_a_synthetic_official_checkpoint(tmp_path, backbone):
    torch.manual_seed(0)
    kwargs = dict(TINY_RESNET) if backbone == "resnet50" else {"base_width": 4}
    source = tiny_model(backbone=backbone, backbone_kwargs=kwargs, pyramid_bins=(8, 4, 2, 1))
    _randomise_batchnorm(source, torch.Generator().manual_seed(2))
    vgg = backbone == "vgg16_bn"
    checkpoint = _official_checkpoint(source, vgg)
    keys = checkpoint["state_dict"]
    assert "module.inital_beta_conv.0.0.weight" in keys and "module.alpha_conv.0.0.weight" in keys
    assert not [k for k in keys if k.startswith("module.layer0.conv")]  # the official ResNet stem is a Sequential
    for key in keys:
        assert original_key_to_ours(key.removeprefix("module."), vgg) in source.state_dict()

    config = infer_ntrenet_config({k.removeprefix("module."): v for k, v in keys.items()}, pyramid_bins=(8, 4, 2, 1))
    assert (config.backbone, config.backbone_kwargs, config.reduce_dim, config.background_prototype_dim) == (
        backbone,
        {"base_width": 8, "depths": [1, 1, 1, 1]} if not vgg else {"base_width": 4},
        16,
        24,
    )

    path = tmp_path / "official.pth"
    torch.save(checkpoint, path)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import convert_original_checkpoint as cli
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    output = tmp_path / "converted"
    args = ["--model-type", "ntrenet", "--checkpoint", str(path), "--output-dir", str(output), "--image-size", "65"]
    assert cli.main([*args, "--shot", "5", "--pyramid-bins", "8", "4", "2", "1"]) == 0
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in output.iterdir()}
    converted = AutoModel.from_pretrained(output).eval()
    assert converted.config.shot == 5 and converted.config.pyramid_bins == (8, 4, 2, 1)
    query, support, masks, _ = random_episode(batch_size=1, shot=1)
    with torch.no_grad():
        torch.testing.assert_close(
            converted(query, support, masks).logits, source(query, support, masks).logits, rtol=0, atol=0
        )


def test_converter_reports_missing_unexpected_and_uninferable_checkpoints(tmp_path):
    torch.manual_seed(0)
    source = tiny_model()
    state = _official_checkpoint(source, vgg=False)["state_dict"]

    broken = dict(state)
    del broken["module.down_bg.0.weight"]
    broken["module.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['down_bg.0.weight'\].*unexpected keys.*extra_head"):
        convert_ntrenet_state_dict(broken, pyramid_bins=(9, 4, 2, 1))
    with pytest.raises(ValueError, match="pass their sizes"):
        convert_ntrenet_state_dict(
            {k: v for k, v in state.items() if ".3." not in k or "init" not in k}, pyramid_bins=None
        )
    with pytest.raises(ValueError, match="not an NTRENet checkpoint"):
        convert_ntrenet_state_dict({"module.fc.weight": torch.zeros(1)})

    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": state}, path)
    model = convert_ntrenet_checkpoint(path, tmp_path / "out", image_size=65, pyramid_bins=(9, 4, 2, 1))
    assert isinstance(model, NTRENetModel) and not model.training
    # official checkpoints are pickles: refuse arbitrary objects
    torch.save({"state_dict": state, "args": _Unpicklable()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        convert_ntrenet_checkpoint(path, tmp_path / "out2", image_size=65, pyramid_bins=(9, 4, 2, 1))


class _Unpicklable:
    pass


# --- the shared tester mixin ---------------------------------------------------------------------------------------
class TestNTRENetModel(FewShotModelTesterMixin):
    model_class = NTRENetModel
    config_kwargs = {"backbone_kwargs": dict(TINY_RESNET), **TINY}

    def training_inputs(self, batch_size):
        return {"class_ids": torch.arange(1, batch_size + 1)}


class TestNTRENetVGGModel(TestNTRENetModel):
    config_kwargs = {"backbone": "vgg16_bn", "backbone_kwargs": {"base_width": 8}, **TINY}


class TestNTRENetDinov2Model(TestNTRENetModel):
    config_kwargs = {"backbone_config": TINY_DINOV2, **TINY}


class TestNTRENetTransformersResNetModel(TestNTRENetModel):
    config_kwargs = {"backbone_config": TINY_HF_RESNET, **TINY}
