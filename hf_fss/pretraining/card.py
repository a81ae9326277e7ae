"""The model card of an exported prior extractor, rendered from the run record (nothing hard-coded but prose)."""

from __future__ import annotations

import json

__all__ = ["render_prior_card"]


def _data_line(record: dict) -> str:
    splits = ", ".join(record["splits"])
    line = f"{record['num_images']} unlabeled images of `{record['dataset']}` (split(s): {splits})."
    if record["include_eval_images"]:
        line += (
            " `--include-eval-images` was used (the paper's \"all the images in the dataset\"): the evaluation split's "
            "images, i.e. the few-shot test queries, were seen without labels during pretraining."
        )
    else:
        line += " Training split only: the few-shot test images were not seen (the paper used all images)."
    return line


def _probe_section(probe: dict) -> str:
    if not probe:
        return ""
    rows = ["| | " + " | ".join(f"{t:.1f}" for t in probe["thresholds"]) + " |"]
    rows.append("|---|" + "---|" * len(probe["thresholds"]))
    for name in ("pretrained", "random"):
        for metric in ("recall", "precision"):
            values = " | ".join(f"{100 * v:.1f}" for v in probe[name][metric])
            rows.append(f"| {metric}, {name} | {values} |")
    knn = (
        f"k-NN accuracy: pretrained {100 * probe['pretrained']['knn_accuracy']:.1f}%, random "
        f"{100 * probe['random']['knn_accuracy']:.1f}% ({probe['num_classes']} classes)."
    )
    return (
        "\n## Probe\n\n"
        f"On {probe['description']}. Cosine region maps (paper Eq. 9-12, with a masked support's features of this "
        "extractor) thresholded as in the paper's Table VII, and a k-NN probe of pooled features:\n\n"
        + "\n".join(rows)
        + f"\n\n{knn}\n"
    )


def render_prior_card(record: dict) -> str:
    """Markdown card of the prior extractor from `record` (what `hf_fss.pretraining.training` writes to run.json)."""
    model, arguments = record["model"], record["arguments"]
    superpixels = arguments["superpixels"]
    if superpixels == "slic":
        parameters = (
            f"n_segments={arguments['slic_segments']}, compactness={arguments['slic_compactness']}, "
            f"sigma={arguments['slic_sigma']}"
        )
    else:
        parameters = (
            f"scale={arguments['felzenszwalb_scale']}, sigma={arguments['felzenszwalb_sigma']}, "
            f"min_size={arguments['felzenszwalb_min_size']}"
        )
    form = (
        "superpixel patches as extra encoder inputs (the paper's Fig. 3): the superpixel's bounding box, pixels "
        "outside it set to the mean colour, two augmented views through the same encoders and head"
        if model["local_form"] == "patch"
        else "mask pooling of the dense feature map over the superpixel carried through each view's crop and flip "
        "(an option; not what the paper's Fig. 3 shows)"
    )
    losses = f"L = {model['local_weight']} x L_local + {model['global_weight']} x L_global"
    if model["local_weight"] == 0:
        losses += " (global only)"
    elif model["global_weight"] == 0:
        losses += " (local only)"
    init = arguments.get("init_weights") or "random (as MoCo; the paper does not say)"
    return f"""---
library_name: hf_fss
tags:
- few-shot-segmentation
- qgnet
- prior-extractor
- moco
---

# QGNet prior extractor ({record["backbone"]} {json.dumps(record["backbone_kwargs"])}, {record["epochs"]} epoch(s), {superpixels})

The prior extractor of QGNet ("Few-Shot Segmentation with Global and Local Contrastive Learning", Liu et al., §IV-A), pretrained without
labels by hf_fss's implementation of the global (MoCo v2, Eq. 1) + local (superpixel patches, Eq. 6) contrastive
loss (Eq. 7). No official code of this pretraining exists; this is the implementation of `scripts/pretrain_prior.py`.

- Weights: the `{arguments["export_encoder"]}` backbone, stage
  names of `hf_fss.backbones.DilatedResNet` (`{record["backbone"]}`, kwargs `{json.dumps(record["backbone_kwargs"])}`),
  pretrained undilated (output stride 32); QGNet dilates it when loading
  (`DilatedResNet(..., output_stride=8).load_weights(folder)`, or `QGNetConfig(prior_extractor_weights=...)`).
- Data: {_data_line(record)}
- Schedule: {record["steps"]} steps, {record["epochs"]} epoch(s), {record["batch_size_per_process"]} images x
  {record["num_processes"]} process(es) x {record["gradient_accumulation_steps"]} accumulation =
  {record["global_batch_size"]} per step; SGD lr {record["learning_rate"]:.4g} (0.03 per 256 images, linear scaling),
  momentum {arguments["momentum"]}, weight decay {arguments["weight_decay"]}, schedule {arguments["lr_schedule"]}.
- Views: MoCo v2 aug-plus at {arguments["image_size"]} px (random resized crop 0.2-1, colour jitter 0.4/0.4/0.4/0.1
  p 0.8, grayscale p 0.2, Gaussian blur sigma 0.1-2 p 0.5, flip).

## Choices where the paper is silent

- Local form: {form}.
- Superpixels: `skimage.segmentation.{superpixels}` ({parameters}), computed once per un-augmented image; superpixels
  under {100 * arguments["superpixel_min_area"]:.1f}% of the image are not sampled; one patch per image per step.
- Loss: {losses}; temperature tau = {model["temperature"]} for both (MoCo v2's; the paper gives none; Eq. 6's `+ tau`
  is read as `/ tau`); {"symmetric" if model["symmetric"] else "one direction (MoCo v2)"}; no cross terms between
  global and local representations.
- Queues: K = {model["queue_size"]} image keys, M = {model["patch_queue_size"]} patch keys (paper: 65536 each);
  key encoder momentum {model["momentum"]}; MLP head hidden width {model["head_hidden_dim"] or "C (backbone output)"},
  embedding {model["embedding_dim"]}.
- Batch norm of the key encoder: {"Shuffle-BN across processes" if record["num_processes"] > 1 else f"{model['bn_splits']} split(s) (MoCo colab's single-device emulation of Shuffle-BN)"}.
- Initialisation: {init}.
- Images: {"all splits" if record["include_eval_images"] else "training split only"}.
{_probe_section(record.get("probe"))}"""
