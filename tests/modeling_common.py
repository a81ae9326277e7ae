"""
The tests every hf_fss method passes, in the spirit of transformers' `ModelTesterMixin`.

A method's test class sets `model_class` and `config_kwargs` (a tiny configuration) and, when training needs them,
overrides `training_inputs`; everything else is shared. Inputs are non-square (`image_size` x `image_width`) on
purpose: the official code of several methods assumes square maps.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_episode
from torch import nn

from hf_fss.backbones import StagedBackbone


class FewShotModelTesterMixin:
    model_class: type
    config_kwargs: dict = {}
    image_size = 65
    image_width = 81
    # Eval logits of a batch and of its items one by one agree to this tolerance (convolutions may pick other kernels
    # for other batch sizes).
    batch_tolerance = 1e-5

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


def assert_extractor_skipped_by_sync_batchnorm(model: nn.Module) -> None:
    """Every frozen extractor with BN in eval keeps plain BatchNorm2d; every other BN becomes SyncBatchNorm."""
    model.convert_sync_batchnorm()
    for name, module in model.named_modules():
        if isinstance(module, StagedBackbone) and module.frozen and module.batchnorm_eval:
            assert not any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()), name


__all__ = ["FewShotModelTesterMixin", "assert_extractor_skipped_by_sync_batchnorm", "random_episode"]
