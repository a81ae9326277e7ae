"""
The tests every hf_fss method passes, in the spirit of transformers' `ModelTesterMixin`.

A method's test class sets `model_class` and `config_kwargs` (a tiny configuration) and, when training needs them,
overrides `training_inputs`; everything else is shared. Inputs are non-square (`image_size` x `image_width`) on
purpose: the official code of several methods assumes square maps.
"""

from __future__ import annotations

import dataclasses
import json
import typing

import numpy as np
import pytest
import torch
from conftest import random_episode
from torch import nn
from transformers import pipeline

from hf_fss.backbones import StagedBackbone


class FewShotModelTesterMixin:
    model_class: type
    config_kwargs: dict = {}
    image_size = 65
    image_width = 81
    # Eval logits of a batch and of its items one by one agree to this tolerance (convolutions may pick other kernels
    # for other batch sizes).
    batch_tolerance = 1e-5
    # Config overrides under which the method's test-time adaptation diverges (CRCNet's K-shot finetuning at a huge
    # learning rate): every shot-fusion mode must still give finite logits.
    divergent_overrides: dict = {}

    # --- hooks ---------------------------------------------------------------------------------------------------
    def get_model(self, **overrides):
        torch.manual_seed(0)
        config = self.model_class.config_class(**{**self.config_kwargs, **overrides})
        return self.model_class(config)

    def training_inputs(self, batch_size: int) -> dict:
        """Extra training inputs the method declares (e.g. NTRENet's `class_ids`)."""
        return {}

    def episode(self, batch_size=2, shot=1, seed=0):
        generator = torch.Generator().manual_seed(seed)
        return random_episode(batch_size, shot, self.image_size, generator, width=self.image_width)

    # --- save / load ---------------------------------------------------------------------------------------------
    def test_save_load_round_trip_is_bit_identical(self, tmp_path):
        model = self.get_model().eval()
        model.save_pretrained(tmp_path)
        loaded = self.model_class.from_pretrained(tmp_path).eval()
        assert type(loaded) is self.model_class
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        query, support, masks, _ = self.episode()
        with torch.no_grad():
            torch.testing.assert_close(loaded(query, support, masks).logits, model(query, support, masks).logits,
                                       rtol=0, atol=0)  # fmt: skip

    # --- support encoding ----------------------------------------------------------------------------------------
    @pytest.mark.parametrize("shot", [1, 5])
    def test_k_shot_outputs_and_encoding_reuse(self, shot):
        model = self.get_model().eval()
        query, support, masks, _ = self.episode(batch_size=2, shot=shot)
        with torch.no_grad():
            plain = model(query, support, masks)
            encoding = model.encode_support(support, masks)
            reused = model(query, support_encoding=encoding)
        assert plain.logits.shape == (2, 2, self.image_size, self.image_width)
        assert torch.isfinite(plain.logits).all()
        assert encoding.shot == shot
        torch.testing.assert_close(reused.logits, plain.logits, rtol=0, atol=0)
        for name, value in (plain.maps or {}).items():
            assert value.dim() == 4 and value.shape[:2] == (2, 1), name
            assert name in model.output_maps, f"map {name!r} is not described in {type(model).__name__}.output_maps"
        assert set(model.binary_maps) <= set(model.output_maps)

    def test_one_support_set_serves_a_batch_of_queries(self):
        model = self.get_model().eval()
        query, support, masks, _ = self.episode(batch_size=3, shot=2)
        one_set = (support[:1].expand(3, -1, -1, -1, -1), masks[:1].expand(3, -1, -1, -1))
        with torch.no_grad():
            broadcast = model(query, support_encoding=model.encode_support(support[:1], masks[:1]))
            repeated = model(query, *one_set)
        torch.testing.assert_close(broadcast.logits, repeated.logits, rtol=0, atol=self.batch_tolerance)

    def test_eval_logits_do_not_depend_on_the_batch(self):
        model = self.get_model().eval()
        query, support, masks, _ = self.episode(batch_size=3, shot=2)
        with torch.no_grad():
            batched = model(query, support, masks).logits
            single = torch.cat(
                [model(query[i : i + 1], support[i : i + 1], masks[i : i + 1]).logits for i in range(3)]
            )
        torch.testing.assert_close(batched, single, rtol=0, atol=self.batch_tolerance)

    # --- training ------------------------------------------------------------------------------------------------
    def _train_step(self, model):
        query, support, masks, labels = self.episode(batch_size=2, shot=2)
        model.train()
        outputs = model(query, support, masks, labels=labels, **self.training_inputs(2))
        trainable = [p for p in model.parameters() if p.requires_grad]
        if trainable:
            outputs.loss.backward()
            torch.optim.SGD(trainable, lr=0.1).step()
        return outputs

    def test_training_step_gives_a_finite_loss_and_gradients_on_trainable_parameters_only(self):
        model = self.get_model()
        outputs = self._train_step(model)
        assert outputs.loss.dim() == 0 and torch.isfinite(outputs.loss)
        assert all(torch.isfinite(v) for v in outputs.losses.values())
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            else:
                assert parameter.grad is None, name

    def test_frozen_extractors_are_bit_identical_after_a_training_step(self):
        model = self.get_model()
        extractors = {n: m for n, m in model.feature_extractors().items() if m.frozen}
        assert extractors, "a method with no frozen extractor must override this test"
        before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in extractors.items()}
        self._train_step(model)
        assert all(not m.training for m in extractors.values() if m.batchnorm_eval)
        for name, module in extractors.items():
            for key, value in module.state_dict().items():
                assert torch.equal(before[name][key], value), f"{name}.{key}"

    # --- bad input -----------------------------------------------------------------------------------------------
    @pytest.mark.parametrize(
        ("case", "message"),
        [
            ("query_rank", "pixel_values must be"),
            ("support_rank", "support_pixel_values must be"),
            ("mask_rank", "support_masks must be"),
            ("shot_mismatch", "disagree on batch size or shot"),
            ("mask_size", "differs from the support image size"),
            ("batch_mismatch", "support sets but pixel_values holds"),
            ("labels_shape", "labels must have shape"),
            ("empty_mask", "no target pixel"),
            ("undeclared_input", "unexpected input"),
            ("no_shot", "no support image"),
            ("nan_query", "pixel_values holds NaN"),
            ("inf_support", "support_pixel_values holds NaN or infinite"),
            ("label_map_support", r"support_masks must hold only 0 .*got also \[7\]"),
            ("label_map_labels", r"labels must hold only 0 .*got also \[3\]"),
        ],
    )
    def test_bad_inputs_raise_value_errors_naming_the_argument(self, case, message):
        model = self.get_model().eval()
        q, s, k, labels = self.episode(batch_size=2, shot=2)
        calls = {
            "query_rank": lambda: model(q[0], s, k),
            "support_rank": lambda: model(q, s[:, 0], k),
            "mask_rank": lambda: model(q, s, k[:, 0]),
            "shot_mismatch": lambda: model(q, s, k[:, :1]),
            "mask_size": lambda: model(q, s, k[..., :-1]),
            "batch_mismatch": lambda: model(q[:1], s, k),
            "labels_shape": lambda: model(q, s, k, labels=labels[..., :-1]),
            "empty_mask": lambda: model(q, s, torch.zeros_like(k)),
            "undeclared_input": lambda: model(q, s, k, support_semantic_lables=k),
            "no_shot": lambda: model(q, s[:, :0], k[:, :0]),
            "nan_query": lambda: model(q.index_fill(-1, torch.tensor([3]), float("nan")), s, k),
            "inf_support": lambda: model(q, s.index_fill(-1, torch.tensor([3]), float("inf")), k),
            "label_map_support": lambda: model(q, s, k.masked_fill(k == 1, 7)),
            "label_map_labels": lambda: model(q, s, k, labels=labels.masked_fill(labels == 1, 3)),
        }
        with torch.no_grad(), pytest.raises(ValueError, match=message):
            calls[case]()

    # --- reduced precision and non-finite outputs -----------------------------------------------------------------
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_reduced_precision_through_from_pretrained_and_the_pipeline(self, tmp_path, dtype):
        model = self.get_model().eval()
        model.save_pretrained(tmp_path)
        loaded = self.model_class.from_pretrained(tmp_path, dtype=dtype).eval()
        assert loaded.dtype == dtype
        query, support, masks, _ = self.episode(batch_size=2, shot=2)
        with torch.no_grad():
            reference = model(query, support, masks).logits.softmax(dim=1)[:, 1]
            logits = loaded(query.to(dtype), support.to(dtype), masks).logits
        assert logits.dtype == dtype and torch.isfinite(logits).all()
        difference = (logits.float().softmax(dim=1)[:, 1] - reference).abs()
        assert difference.mean() < 0.01 and difference.max() < 0.05, (difference.mean(), difference.max())

        rng = np.random.default_rng(0)
        images = [(rng.random((50, 70, 3)) * 255).astype(np.uint8) for _ in range(3)]
        mask = np.zeros((50, 70), dtype=np.uint8)
        mask[10:30, 20:50] = 1
        supports = {"support_image": images[1:], "support_mask": [mask, mask], "output_type": "numpy"}
        low = pipeline("few-shot-segmentation", model=str(tmp_path), dtype=dtype)
        assert low.model.dtype == dtype
        result = low(images[0], **supports)
        full = pipeline("few-shot-segmentation", model=str(tmp_path))(images[0], **supports)
        assert result["scores"].dtype == np.float32 and np.isfinite(result["scores"]).all()
        assert np.abs(result["scores"] - full["scores"]).mean() < 0.01

    @pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
    def test_reduced_precision_through_evaluate_script(self, tmp_path, dtype):
        from hf_fss.evaluation.runner import main

        self.get_model().save_pretrained(tmp_path / "model")
        data = ["--dataset", "synthetic", "--synthetic-num-train", "0", "--synthetic-num-val", "60",
                "--synthetic-image-size", "128", "--num-threads", "1", "--num-episodes", "2", "--shot", "2"]  # fmt: skip
        metrics = {}
        for name in ("float32", dtype):
            out = tmp_path / f"{name}.json"
            assert main(["--model", str(tmp_path / "model"), *data, "--dtype", name, "--output", str(out)]) == 0
            metrics[name] = json.loads(out.read_text())
        assert metrics[dtype]["dtype"] == dtype and 0.0 <= metrics[dtype]["miou"] <= 1.0
        assert abs(metrics[dtype]["miou"] - metrics["float32"]["miou"]) < 0.05

    def _shot_fusion_modes(self) -> tuple:
        """The values of the config's `shot_fusion` field (its `Literal` type), or `(None,)` without that field."""
        fields = {f.name: f for f in dataclasses.fields(self.model_class.config_class)}
        if "shot_fusion" not in fields:
            return (None,)
        modes = typing.get_args(fields["shot_fusion"].type)
        assert modes, f"shot_fusion of {self.model_class.config_class.__name__} is not a Literal of its modes"
        return modes

    def test_every_shot_fusion_mode_gives_finite_logits_even_when_adaptation_diverges(self):
        query, support, masks, _ = self.episode(batch_size=2, shot=2)
        for overrides in [{}, self.divergent_overrides] if self.divergent_overrides else [{}]:
            for mode in self._shot_fusion_modes():
                fusion = {} if mode is None else {"shot_fusion": mode}
                model = self.get_model(**overrides, **fusion).eval()
                with torch.no_grad():
                    logits = model(query, support, masks).logits
                assert torch.isfinite(logits).all(), (mode, overrides)

    @pytest.mark.parametrize(
        ("case", "message"),
        [
            ("nan_weight", r"non-finite logits from finite inputs; its weights are not finite \(backbone\."),
            ("float16_overflow", r"non-finite logits from finite inputs; an intermediate overflowed in float16"),
        ],
    )
    def test_non_finite_logits_raise_a_value_error_naming_the_model_and_the_cause(self, case, message):
        model = self.get_model().eval()
        query, support, masks, _ = self.episode(batch_size=1, shot=2)
        first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            if case == "nan_weight":
                first_conv.weight[0, 0, 0, 0] = float("nan")
            else:  # finite float16 weights and images whose products exceed float16's range (65504)
                model.half()
                first_conv.weight.div_(first_conv.weight.abs().max()).mul_(60000)
                query, support = query.half() * 100, support.half() * 100
            with pytest.raises(ValueError, match=f"^{self.model_class.__name__} produced {message}"):
                model(query, support, masks)


def assert_extractor_skipped_by_sync_batchnorm(model: nn.Module) -> None:
    """Every frozen extractor with BN in eval keeps plain BatchNorm2d; every other BN becomes SyncBatchNorm."""
    model.convert_sync_batchnorm()
    for name, module in model.named_modules():
        if isinstance(module, StagedBackbone) and module.frozen and module.batchnorm_eval:
            assert not any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()), name


__all__ = ["FewShotModelTesterMixin", "assert_extractor_skipped_by_sync_batchnorm", "random_episode"]
