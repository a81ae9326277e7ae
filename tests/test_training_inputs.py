"""
Declared extra inputs end to end: the episodic training dataset emits what a model declares (here a tiny test model
taking `class_ids` on the query side and `support_semantic_labels` on the support side), the generic training loop
passes the batch as it is, and evaluation passes the declared inputs a test batch holds, under `torch.no_grad()`.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_fss.configuration_fss import FewShotSegmentationConfig
from hf_fss.data import EpisodicTrainDataset, fold_classes, load_benchmark, make_test_episodes
from hf_fss.evaluation.runner import evaluate_model
from hf_fss.image_processing_fss import FewShotSegmentationImageProcessor
from hf_fss.modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding
from hf_fss.training.arguments import LoopArguments
from hf_fss.training.loop import TrainingLoop, create_accelerator, create_dataloader, create_optimizer

SIZE, SHOT, BATCH = 33, 2, 2


class _SupportLabelsConfig(FewShotSegmentationConfig):
    model_type = "support_labels_test"


@dataclass
class _Encoding(SupportEncoding):
    pooled: torch.FloatTensor | None = None


class _SupportLabelsModel(FewShotSegmentationPreTrainedModel):
    """A 1x1 convolution; records the extra inputs it receives."""

    config_class = _SupportLabelsConfig
    query_inputs = ("class_ids",)
    support_inputs = ("support_semantic_labels",)

    def __init__(self, config):
        super().__init__(config)
        self.head = nn.Conv2d(3, 2, 1)
        self.received = []
        self.post_init()

    def _encode_support(self, support_pixel_values, support_masks, support_semantic_labels=None):
        self.received.append(
            {
                "support_semantic_labels": support_semantic_labels,
                "support_masks": support_masks,
                "inference_mode": torch.is_inference_mode_enabled(),
            }
        )
        return _Encoding(shot=support_pixel_values.shape[1], pooled=support_pixel_values.mean((1, 3, 4)))

    def _segment(self, pixel_values, support_encoding, labels=None, class_ids=None):
        self.received[-1]["class_ids"] = class_ids
        logits = self.head(pixel_values + support_encoding.pooled[:, :, None, None])
        loss = None if labels is None else F.cross_entropy(logits, labels, ignore_index=255)
        return FewShotSegmentationOutput(loss=loss, logits=logits, losses={} if loss is not None else None)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def synthetic():
    return load_benchmark("synthetic", num_train=80, num_val=40, image_size=128)


def _dataset(synthetic, model):
    fold = fold_classes("synthetic", 0)
    extra = model.query_inputs + model.support_inputs
    return fold, EpisodicTrainDataset(synthetic["train"], fold, shot=SHOT, size=SIZE, seed=0, extra_inputs=extra)


def test_model_declaring_support_semantic_labels_receives_them_from_the_training_dataset(synthetic, tmp_path):
    torch.manual_seed(0)
    model = _SupportLabelsModel(_SupportLabelsConfig(image_size=SIZE))
    fold, dataset = _dataset(synthetic, model)
    item = dataset[0]
    assert set(item) == {"pixel_values", "labels", "support_pixel_values", "support_masks", "class_ids",
                         "support_semantic_labels"}  # fmt: skip

    args = LoopArguments(output_dir=str(tmp_path), batch_size=BATCH, max_steps=1, report_to="none", seed=0)
    loop = TrainingLoop(create_accelerator(args), args, tmp_path)
    loop.prepare(model, create_optimizer(model, args), create_dataloader(dataset, args))
    before = model.head.weight.detach().clone()
    assert loop.run().global_step == 1
    assert not torch.equal(before, model.head.weight)

    (call,) = model.received
    labels, masks, class_ids = call["support_semantic_labels"], call["support_masks"], call["class_ids"]
    assert labels.shape == (BATCH, SHOT, SIZE, SIZE) and labels.dtype == torch.long
    assert class_ids.shape == (BATCH,)
    # The same id mapping as `semantic_labels`: base class -> its rank in fold.base (1-based), 255 kept.
    assert set(labels.unique().tolist()) <= set(range(len(fold.base) + 1)) | {255}
    for b, class_id in enumerate(class_ids.tolist()):
        rank = fold.base.index(class_id) + 1
        assert torch.equal(labels[b] == rank, masks[b] == 1)
        assert torch.equal(labels[b] == 255, masks[b] == 255)


def test_unknown_or_misspelt_extra_inputs_raise(synthetic):
    fold = fold_classes("synthetic", 0)
    with pytest.raises(ValueError, match="support_semantic_label'"):
        EpisodicTrainDataset(synthetic["train"], fold, shot=1, size=SIZE, extra_inputs=("support_semantic_label",))
    model = _SupportLabelsModel(_SupportLabelsConfig(image_size=SIZE))
    _, dataset = _dataset(synthetic, model)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    batch["support_semantic_label"] = batch.pop("support_semantic_labels")
    with pytest.raises(ValueError, match="support_semantic_label'"):
        model(**batch)
    # A dataset that emits an input the model does not declare is refused by the model, never filtered silently.
    extra = EpisodicTrainDataset(synthetic["train"], fold, shot=SHOT, size=SIZE, extra_inputs=("semantic_labels",))
    with pytest.raises(ValueError, match="semantic_labels"):
        model(**torch.utils.data.default_collate([extra[0]]))


def test_evaluation_passes_declared_inputs_without_inference_mode(synthetic):
    model = _SupportLabelsModel(_SupportLabelsConfig(image_size=SIZE))
    fold = fold_classes("synthetic", 0)
    split = synthetic["validation"]
    episodes = make_test_episodes(split, fold.novel, 3, 1, seed=1)
    processor = FewShotSegmentationImageProcessor(image_size=SIZE)
    evaluate_model(model, processor, split, episodes, class_ids=fold.novel, progress=False)
    assert len(model.received) == 3
    for call, episode in zip(model.received, episodes):
        assert not call["inference_mode"]
        assert call["class_ids"].tolist() == [episode.class_id]
        assert call["support_semantic_labels"] is None  # a test batch has none
