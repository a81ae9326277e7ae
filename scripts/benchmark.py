"""
Speed and memory of the hf_fss methods: episodes per second, latency, and the gain from encoding a support set once.

For every method and size it times, on the same random inputs in one run:
- `full`: `model(pixel_values, support_pixel_values, support_masks)`, one episode per call;
- `query_only`: `model(pixel_values, support_encoding=enc)` with `enc = model.encode_support(...)` computed once,
  what a support set costs when it serves many queries (the Space, the pipeline);
- `encode_support`: `model.encode_support(...)` alone, the per-support-set cost (for CRCNet with K > 1 and
  `shot_fusion` finetune / finetune+average, the time its test-time finetuning takes).
Ratios between rows of one run are what to compare; absolute numbers depend on the machine and its load.

Per timed call (one episode at the default --batch-size 1) it records the median wall time and, from
`resource.getrusage(RUSAGE_SELF)` read just before and after the call (the whole process, all threads), the median
user and system CPU time and minor / major page faults: `*_latency_ms`, `*_user_ms`, `*_system_ms`,
`*_minor_faults`, `*_major_faults` for `full` and `query_only`. High system time with many minor faults usually
means large temporary tensors are mapped fresh from the OS on every call (and handed back after it).

    python scripts/benchmark.py                                  # every method, tiny and base sizes, CPU
    python scripts/benchmark.py --model-types ntrenet --sizes base --shots 1 5 --device cuda --output bench.json

`--dtype bfloat16|float16` (autocast, weights float32) and `--channels-last` run hf_fss as evaluate.py does with them
(`hf_fss.utils.inference_precision`, on CPU too) and add, per method, its full episode against a float32 contiguous
copy of the model, interleaved: speed-up in wall and CPU time, max logit difference, pixel agreement (argmax equal).

Against the official code: `--official METHOD=DIR` (repeatable, one per method; ntrenet, qgnet and smcp have a
builder: `build_official_model` in their converter) builds the official model from the checkout DIR (built out of
tree with the fixes it needs to run here; hf_fss ships none of it), converts its weights into the hf_fss model, and
times both on the same episodes, interleaved (official, hf_fss, official, ...), full episode per call, reporting the
medians, the ratio hf_fss / official (wall and CPU time), the largest logit difference and the pixel agreement; the
official code always runs in float32, hf_fss in `--dtype` / `--channels-last`. A shot the official code cannot run (SMCP's is
1-shot only) is listed as not run, with the reason:

    python scripts/benchmark.py --official ntrenet=../official/ntrenet --shots 1 5 --iterations 5 --num-threads 2
    python scripts/benchmark.py --official qgnet=../official/qgnet --official smcp=../official/smcp --shots 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError

import hf_fss
from hf_fss.cli import (
    IMAGE_SIDE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    ScriptArgumentParser,
    json_object,
    os_error_line,
)
from hf_fss.evaluation.arguments import PrecisionArguments, add_arguments
from hf_fss.models.official import official_builder
from hf_fss.utils import set_num_threads
from hf_fss.utils.io import OutputLock, atomic_write_text, check_output_path
from hf_fss.utils.precision import channels_last_input, check_precision, inference_precision, logit_agreement

# Model sizes: `base` is the papers' configuration (each method's default backbone), `tiny` the one the tests use.
SIZES = {
    "base": {},
    "tiny": {
        "reduce_dim": 16,
        "prior_extractor_kwargs": {"stem": "7x7", "base_width": 8, "depths": [1, 1, 1, 1]},  # QGNet's second ResNet
    },
}
# The tiny backbone of each backbone a method may default to.
TINY_BACKBONE_KWARGS = {
    "resnet50": {"base_width": 8, "depths": [1, 1, 1, 1]},
    "resnet101": {"base_width": 8, "depths": [1, 1, 1, 1]},
    "vgg16_bn": {"base_width": 8},
    "vgg16_dilated": {"base_width": 8},
}


QUERIES_PER_SUPPORT = 8


# Config fields the flags set: `--model-kwargs` must not set them too (the inputs are drawn at --image-size).
FLAG_FIELDS = {"image_size": "--image-size", "chunk_extractors_on_cpu": "--no-chunking"}


def build_config(
    model_type: str, size: str, image_size: int, chunking: bool = True, model_kwargs: dict | None = None
) -> hf_fss.FewShotSegmentationConfig:
    """
    The config of `model_type` at `size` ("tiny" / "base"), with the `model_kwargs` fields its config has.

    Raises:
        `ValueError` / `huggingface_hub.errors.StrictDataclassError`: a value the config's validator refuses.
    """
    config_class = hf_fss.MODEL_CLASSES[model_type][0]
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    adapter_sizes = getattr(config_class, "benchmark_sizes", None)
    if adapter_sizes is not None:  # an adapter of another model (SegGPT) names its own shapes; no backbone to chunk
        overrides = {k: v for k, v in {**adapter_sizes[size], **(model_kwargs or {})}.items() if k in defaults}
        return config_class(image_size=image_size, **overrides)
    # `--model-kwargs` fields apply to the methods whose config has them (e.g. CRCNet's `shot_fusion`).
    overrides = {k: v for k, v in {**SIZES[size], **(model_kwargs or {})}.items() if k in defaults}
    # A transformers backbone (`backbone_config`) is timed at the size its config gives, whatever the method's size.
    if size == "tiny" and "backbone_kwargs" not in overrides and "backbone_config" not in overrides:
        overrides["backbone_kwargs"] = TINY_BACKBONE_KWARGS[defaults["backbone"]]
    return config_class(image_size=image_size, chunk_extractors_on_cpu=chunking, **overrides)


def build_model(
    model_type: str, size: str, image_size: int, chunking: bool = True, model_kwargs: dict | None = None
) -> torch.nn.Module:
    config = build_config(model_type, size, image_size, chunking, model_kwargs)
    return hf_fss.MODEL_CLASSES[model_type][1](config).eval()


def check_model_kwargs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """
    Build (and drop) every config the run will time, so a `--model-kwargs` field no selected method has, one a flag
    sets, or a value a config validator refuses is a usage error naming the field (one line, exit 2) before any
    timing, not a traceback minutes into the run.
    """
    if not args.model_kwargs:
        return
    fields = set().union(*({f.name for f in dataclasses.fields(hf_fss.MODEL_CLASSES[m][0])} for m in args.model_types))
    unknown = sorted(set(args.model_kwargs) - fields)
    if unknown:
        parser.error(f"--model-kwargs {unknown}: no selected method's config has these fields")
    clash = sorted(set(args.model_kwargs) & set(FLAG_FIELDS))
    if clash:
        parser.error(f"--model-kwargs {clash[0]!r}: set it with {FLAG_FIELDS[clash[0]]} instead")
    for model_type in args.model_types:
        for size in args.sizes:
            image_size = image_size_for(model_type, size, args.image_size)
            try:
                build_config(model_type, size, image_size, args.chunking, args.model_kwargs)
            except (StrictDataclassError, ValueError) as err:
                cause = err.__cause__ if err.__cause__ is not None else err
                parser.error(f"--model-kwargs: {model_type} ({size}) refuses it: {' '.join(str(cause).split())}")


def random_episode(batch_size: int, shot: int, image_size: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    query = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    support = torch.randn(batch_size, shot, 3, image_size, image_size, generator=g)
    masks = torch.zeros(batch_size, shot, image_size, image_size, dtype=torch.long)
    masks[..., image_size // 4 : 3 * image_size // 4, image_size // 4 : 3 * image_size // 4] = 1
    return query.to(device), support.to(device), masks.to(device)


def _process_usage() -> tuple[float, float, int, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt, usage.ru_majflt


def _timed_call(fn, device: torch.device) -> tuple[float, ...]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    usage = _process_usage()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    after = _process_usage()
    return (wall, *(a - b for a, b in zip(after, usage)))


def measure_interleaved(fns: dict, iterations: int, warmup: int, device: torch.device) -> dict[str, dict]:
    """
    `measure_calls` for several functions, timed in turn within each iteration (a, b, c, a, b, c, ...) so that a
    change of machine load hits all of them alike and their ratios stay meaningful.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = ("wall_s", "user_s", "system_s", "minor_faults", "major_faults")
    calls = {key: {name: [] for name in names} for key in fns}
    for _ in range(iterations):
        for key, fn in fns.items():
            for name, value in zip(names, _timed_call(fn, device)):
                calls[key][name].append(value)
    return calls


def measure_calls(fn, iterations: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """
    Per call, after `warmup` untimed calls: `wall_s` (seconds), and the process's `user_s` / `system_s` CPU seconds and
    `minor_faults` / `major_faults` (deltas of `resource.getrusage(RUSAGE_SELF)` around the call).
    """
    return measure_interleaved({"fn": fn}, iterations, warmup, device)["fn"]


def time_calls(fn, iterations: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call, after `warmup` untimed calls."""
    return measure_calls(fn, iterations, warmup, device)["wall_s"]


def summarize_calls(prefix: str, calls: dict[str, list[float]]) -> dict[str, float]:
    """Medians over the timed calls, as `{prefix}_latency_ms`, `_user_ms`, `_system_ms`, `_minor_faults`, ..."""
    median = {name: statistics.median(values) for name, values in calls.items()}
    return {
        f"{prefix}_latency_ms": 1000 * median["wall_s"],
        f"{prefix}_user_ms": 1000 * median["user_s"],
        f"{prefix}_system_ms": 1000 * median["system_s"],
        f"{prefix}_minor_faults": median["minor_faults"],
        f"{prefix}_major_faults": median["major_faults"],
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Process-wide peak resident memory (Linux reports KiB): an upper bound for the CPU runs so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_image_size(model_type: str, size: str = "base") -> int:
    """
    The method's own test size: its config's default `image_size` (the paper's: 473, 417 for SMCP, 321 CRCNet); for an
    adapter with `benchmark_sizes` (SegGPT), the input size of the `size` architecture (448 for SegGPT-large).
    """
    config_class = hf_fss.MODEL_CLASSES[model_type][0]
    adapter_sizes = getattr(config_class, "benchmark_sizes", None)
    if adapter_sizes is not None:
        return config_class(**adapter_sizes[size]).image_size
    return next(f.default for f in dataclasses.fields(config_class) if f.name == "image_size")


def image_size_for(model_type: str, size: str, requested: int | None) -> int:
    """
    `--image-size` (else the method's default) for a method of free input size; an adapter of fixed geometry
    (`benchmark_sizes`: SegGPT) always runs at its architecture's size, and a different `--image-size` is reported.
    """
    if getattr(hf_fss.MODEL_CLASSES[model_type][0], "benchmark_sizes", None) is None:
        return requested or default_image_size(model_type)
    fixed = default_image_size(model_type, size)
    if requested and requested != fixed:
        print(
            f"{model_type} ({size}) takes only {fixed} x {fixed} images: --image-size {requested} does not apply to it"
        )
    return fixed


def count_gflop(fn) -> float:
    """GFLOP of one call, counted by torch's `FlopCounterMode` (matmuls and convolutions: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """The machine's measured matmul rate: the best of 5 timed `n x n` products after 2 untimed, in GFLOP/s."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = measure_calls(lambda: a @ b, iterations=5, warmup=2, device=device)["wall_s"]
    return 2 * n**3 / min(times) / 1e9


def training_inputs(model, labels: torch.Tensor, masks: torch.Tensor) -> dict:
    """The extra training inputs a model declares, filled from the episode (one class, base-class label maps)."""
    available = {"class_ids": torch.ones(labels.shape[0], dtype=torch.long, device=labels.device)}
    available.update(semantic_labels=labels, support_semantic_labels=masks)
    return {name: available[name] for name in (*model.query_inputs, *model.support_inputs) if name in available}


def time_training_step(model, query, support, masks, args, device) -> dict[str, list[float]]:
    """Forward with labels, backward and an SGD step on the trainable parameters, per call."""
    labels = masks[:, 0]
    extra = training_inputs(model, labels, masks)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-9)

    def step():
        loss = model(query, support, masks, labels=labels, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    try:
        with _precision(model, args):
            return measure_calls(step, args.iterations, args.warmup, device)
    finally:
        model.eval()


def _precision(model, args):
    """`--dtype` / `--channels-last` for `model`: the helper evaluation and the pipeline use (`inference_precision`)."""
    return inference_precision(model, args.dtype, args.channels_last)


class _ConfigOverrides:
    """Set config values for the duration of a `with` block (restored even on error)."""

    def __init__(self, config, overrides: dict):
        self.config, self.overrides, self.saved = config, overrides, {}

    def __enter__(self):
        self.saved = {name: getattr(self.config, name) for name in self.overrides}
        for name, value in self.overrides.items():
            setattr(self.config, name, value)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.config, name, value)


def single_pass_call(model, query, support, masks):
    """
    For a model whose test time runs more than one pass (it declares `single_pass_overrides`, config values that make
    it a single pass, e.g. SMCP's `{"pseudo_prototype_fusion": False}`): a function running the full episode with them
    set. None for other models.
    """
    overrides = getattr(model, "single_pass_overrides", None)
    if not overrides:
        return None

    def call():
        with _ConfigOverrides(model.config, overrides):
            return model(query, support, masks)

    return call


def _reduced(args) -> bool:
    return args.dtype != "float32" or args.channels_last


def float32_reference(model, query, support, masks, device):
    """With --dtype / --channels-last: a float32, contiguous copy of `model` and a call of it on the episode (autocast
    off), timed interleaved with the others as `full_float32`; `model` keeps its weights."""
    reference, query = copy.deepcopy(model), query.contiguous()

    def call():
        with torch.autocast(device.type, enabled=False):
            return reference(query, support, masks)

    return call


def _precision_row(calls, full_call, reference_call) -> dict:
    """The `full_float32` timing, the speed-up in wall and CPU time and the agreement with the float32 logits."""
    full, plain = calls["full"], calls["full_float32"]
    cpu = [u + s for u, s in zip(full["user_s"], full["system_s"])]
    cpu_float32 = [u + s for u, s in zip(plain["user_s"], plain["system_s"])]
    return {
        **summarize_calls("full_float32", plain),
        "speedup_vs_float32": statistics.median(plain["wall_s"]) / statistics.median(full["wall_s"]),
        "cpu_speedup_vs_float32": statistics.median(cpu_float32) / statistics.median(cpu),
        **{f"{k}_vs_float32": v for k, v in logit_agreement(full_call().logits, reference_call().logits).items()},
    }


def benchmark(model_type, size, shot, args, device, matmul_peak: float) -> dict:
    image_size = image_size_for(model_type, size, args.image_size)
    model = build_model(model_type, size, image_size, args.chunking, args.model_kwargs).to(device)
    query, support, masks = random_episode(args.batch_size, shot, image_size, device)
    reference = float32_reference(model, query, support, masks, device) if _reduced(args) else None
    query = channels_last_input(query, args.channels_last)
    run = torch.compile(model) if args.compile else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # As evaluation and the pipeline: no_grad (a method may adapt to its supports inside).
    with torch.no_grad(), _precision(model, args):
        encoding = model.encode_support(support, masks)

        def support_once():  # one support set serving QUERIES_PER_SUPPORT queries
            reused = model.encode_support(support, masks)
            for _ in range(QUERIES_PER_SUPPORT):
                run(query, support_encoding=reused)

        fns = {
            "full": lambda: run(query, support, masks),
            "query_only": lambda: run(query, support_encoding=encoding),
            "support_once": support_once,
            # Encoding a support set alone: where a method that adapts to its supports (CRCNet's K-shot
            # finetuning) spends its per-support-set time.
            "encode_support": lambda: model.encode_support(support, masks),
        }
        single_pass = single_pass_call(model, query, support, masks)
        if single_pass is not None:
            fns["single_pass"] = single_pass
        if reference is not None:
            fns["full_float32"] = reference
        # Interleaved, so that the ratios (support reuse, extra passes, precision) hold under a changing load.
        calls = measure_interleaved(fns, args.iterations, args.warmup, device)
        gflop = count_gflop(lambda: model(query, support, masks))
        precision = _precision_row(calls, fns["full"], reference) if reference is not None else {}
    full, query_only, served, encode, single = (
        calls.get(k) for k in ("full", "query_only", "support_once", "encode_support", "single_pass")
    )
    single_s = statistics.median(single["wall_s"]) if single else None
    # A training-free baseline, or an adapter hf_fss does not train (SegGPT), has no training step.
    trainable = model.supports_training and any(p.requires_grad for p in model.parameters())
    training = time_training_step(model, query, support, masks, args, device) if args.training and trainable else None
    full_s, query_s = statistics.median(full["wall_s"]), statistics.median(query_only["wall_s"])
    row = {
        "model_type": model_type,
        "size": size,
        "shot": shot,
        "batch_size": args.batch_size,
        "image_size": image_size,
        "chunk_extractors_on_cpu": args.chunking,
        "parameters": sum(p.numel() for p in model.parameters()),
        **summarize_calls("full", full),
        "full_episodes_per_s": args.batch_size / full_s,
        **summarize_calls("query_only", query_only),
        "query_only_episodes_per_s": args.batch_size / query_s,
        "support_reuse_speedup": full_s / query_s,
        **summarize_calls("encode_support", encode),
        **summarize_calls(f"support_once_{QUERIES_PER_SUPPORT}_queries", served),
        "gflop_per_episode": gflop,
        "matmul_peak_share": gflop / full_s / matmul_peak,
        "single_pass_latency_ms": None if single_s is None else 1000 * single_s,
        "test_time_passes_cost": None if single_s is None else full_s / single_s,
        "peak_memory_mb": peak_memory_mb(device),
        "dtype": args.dtype,
        "channels_last": args.channels_last,
        **precision,
    }
    if training is not None:
        row.update(summarize_calls("training_step", training))
    return row


def compare_official(model_type: str, source_dir: str, shot: int, args, device) -> dict:
    """
    The official model of `source_dir` vs the hf_fss model with its weights: interleaved full episodes. A setting the
    official code cannot run (its builder raises `ValueError`) gives a row with the reason in `not_run` instead.
    """
    image_size = args.image_size or default_image_size(model_type)
    try:
        built = official_builder(model_type)(source_dir, shot=shot, image_size=image_size)
    except ValueError as error:  # a setting the official code cannot run (e.g. SMCP with K > 1): say so, go on
        return {"model_type": model_type, "shot": shot, "image_size": image_size, "not_run": str(error)}
    official, ours = built.module.to(device), built.ours.to(device)
    query, support, masks = random_episode(args.batch_size, shot, image_size, device)
    ours_query = channels_last_input(query, args.channels_last)
    # The official code in float32 as published (autocast off); hf_fss in --dtype / --channels-last.
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        reference = built.forward(query, support, masks)
    with torch.no_grad(), _precision(ours, args):
        agreement = logit_agreement(ours(ours_query, support, masks).logits, reference)

        def official_call():
            with torch.autocast(device.type, enabled=False):
                return built.forward(query, support, masks)

        fns = {"official": official_call, "hf_fss": lambda: ours(ours_query, support, masks)}
        measured = measure_interleaved(fns, args.iterations, args.warmup, device)
    del official
    calls = {who: c["wall_s"] for who, c in measured.items()}
    cpu = {who: [u + s for u, s in zip(c["user_s"], c["system_s"])] for who, c in measured.items()}
    medians = {who: statistics.median(values) for who, values in calls.items()}
    cpu_medians = {who: statistics.median(values) for who, values in cpu.items()}
    return {
        "model_type": model_type,
        "shot": shot,
        "image_size": image_size,
        "official_source": built.source,
        "hf_fss_dtype": args.dtype,
        "hf_fss_channels_last": args.channels_last,
        "official_latency_ms": 1000 * medians["official"],
        "hf_fss_latency_ms": 1000 * medians["hf_fss"],
        "hf_fss_over_official": medians["hf_fss"] / medians["official"],
        "official_cpu_ms": 1000 * cpu_medians["official"],
        "hf_fss_cpu_ms": 1000 * cpu_medians["hf_fss"],
        "hf_fss_cpu_over_official": cpu_medians["hf_fss"] / cpu_medians["official"],
        **agreement,
        "calls_s": calls,
        "cpu_s": cpu,
    }


def _official_sources(values: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    sources = {}
    for value in values:
        model_type, _, folder = value.partition("=")
        if not folder:
            parser.error(f"--official takes METHOD=DIR (e.g. ntrenet=../official/ntrenet), got {value!r}")
        try:
            official_builder(model_type)
        except ValueError as error:
            parser.error(f"--official {value}: {error}")
        if not Path(folder).expanduser().is_dir():
            parser.error(f"--official {value}: {folder} is not a folder (the root of the official checkout)")
        sources[model_type] = folder
    return sources


def main(argv=None) -> int:
    parser = ScriptArgumentParser(
        prog="benchmark.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Columns: px the test size; full ms / sys ms / minflt are the medians per full-episode call (wall "
        "time, process system CPU time, minor page faults); query ms the query-only call; reuse x = full ms / query "
        "ms; encode ms the support encoding alone (CRCNet: its K-shot finetuning); "
        f"1+{QUERIES_PER_SUPPORT} ms one support encoding serving {QUERIES_PER_SUPPORT} queries; train ms a "
        "training step (forward with labels, backward, SGD step); GFLOP per full episode (FlopCounterMode); %peak "
        "the episode's GFLOP/s as a share of the measured fp32 matmul rate; peak MB the peak memory (on CPU the whole "
        "process's peak resident memory so far, an upper bound, not the method's own); for a method whose test time takes several "
        "passes (it declares single_pass_overrides, e.g. SMCP's pseudo-prototype fusion), 1-pass ms is the full "
        "episode with one pass and passes x = full ms / 1-pass ms.",
    )
    parser.add_argument(
        "--model-types", nargs="+", default=sorted(hf_fss.MODEL_CLASSES), choices=sorted(hf_fss.MODEL_CLASSES)
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=sorted(SIZES))
    parser.add_argument("--shots", nargs="+", allowed=POSITIVE_INT, default=[1])
    parser.add_argument(
        "--image-size", allowed=IMAGE_SIDE, default=None, help="test size of every method (default: each method's own)"
    )
    parser.add_argument("--batch-size", allowed=POSITIVE_INT, default=1)
    parser.add_argument("--iterations", allowed=POSITIVE_INT, default=5)
    parser.add_argument("--warmup", allowed=NON_NEGATIVE_INT, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--num-threads",
        "--threads",
        dest="threads",
        allowed=POSITIVE_INT,
        default=None,
        help="torch threads (default: the cores available divided by the processes on this machine)",
    )
    parser.add_argument(
        "--no-chunking",
        dest="chunking",
        action="store_false",
        help="run frozen extractors over a stack of images in one call on CPU (chunk_extractors_on_cpu=False)",
    )
    parser.add_argument(
        "--official",
        action="append",
        default=[],
        metavar="METHOD=DIR",
        help="time the official code of METHOD (one whose converter defines build_official_model: ntrenet, qgnet, "
        "smcp) from its checkout DIR against hf_fss with the same weights, interleaved (instead of the per-method "
        "table); repeatable",
    )
    parser.add_argument("--no-training", dest="training", action="store_false", help="skip the training-step timing")
    add_arguments(parser, PrecisionArguments)  # --dtype, --channels-last: hf_fss's side (the official code: float32)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model's forward")
    parser.add_argument(
        "--model-kwargs",
        type=json_object,
        default=None,
        help="JSON object of config fields, applied to each method whose config has them, e.g. "
        '\'{"shot_fusion": "average", "finetune_steps": 50}\'',
    )
    parser.add_argument("--output", type=Path, help="also write the results as JSON")
    args = parser.parse_checked(argv)
    check_model_kwargs(args, parser)
    official = _official_sources(args.official, parser)
    try:
        if args.output:  # before any timing: a folder there, an unwritable place
            check_output_path(args.output, "--output", folder=False)
        # Two benchmarks writing one --output would silently lose one record: the second is refused naming the first.
        with OutputLock(args.output, "--output", beside=True) if args.output else contextlib.nullcontext():
            return _run(args, official)
    except OSError as err:  # a full disk when the record is written: one line, any earlier file intact
        parser.exit(2, f"{parser.prog}: error: {os_error_line(err) if err.errno else err}\n")
    except ValueError as err:  # the output check, or another run holding --output
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def _run(args: argparse.Namespace, official: dict[str, str]) -> int:
    """Time what `args` selects (or the official code against hf_fss), print the table, write `--output`."""
    set_num_threads(args.threads)
    device = torch.device(args.device)
    check_precision(args.dtype, device)  # ValueError: one line, exit 2, nothing written
    if official:
        return _report_official(official, args, device)

    peak = matmul_peak_gflops(device)
    rows = [
        benchmark(model_type, size, shot, args, device, peak)
        for model_type in args.model_types
        for size in args.sizes
        for shot in args.shots
    ]
    _print_rows(rows)
    _print_precision_rows(rows, args)
    print(f"matmul peak {peak:.1f} GFLOP/s (fp32 2048x2048, {torch.get_num_threads()} threads, {device})")
    _print_warmup_note(args.warmup)
    _write_record(args.output, device, rows, matmul_peak_gflops=peak, model_kwargs=args.model_kwargs)
    return 0


def _optional(value: float | None, width: int, decimals: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{decimals}f}"


def _print_rows(rows: list[dict]) -> None:
    served = f"support_once_{QUERIES_PER_SUPPORT}_queries_latency_ms"
    print(
        f"{'method':<13}{'size':<5}{'K':>2}{'px':>5}{'params':>12}{'full ms':>9}{'sys ms':>7}{'minflt':>8}"
        f"{'ep/s':>7}{'query ms':>9}{'reuse x':>8}{'encode ms':>10}{f'1+{QUERIES_PER_SUPPORT} ms':>9}{'train ms':>9}"
        f"{'GFLOP':>8}{'%peak':>6}{'1-pass ms':>10}{'passes x':>9}{'peak MB':>8}"
    )
    for r in rows:
        train = f"{r['training_step_latency_ms']:>9.0f}" if "training_step_latency_ms" in r else f"{'-':>9}"
        print(
            f"{r['model_type']:<13}{r['size']:<5}{r['shot']:>2}{r['image_size']:>5}{r['parameters']:>12,}"
            f"{r['full_latency_ms']:>9.1f}{r['full_system_ms']:>7.1f}{r['full_minor_faults']:>8.0f}"
            f"{r['full_episodes_per_s']:>7.2f}{r['query_only_latency_ms']:>9.1f}{r['support_reuse_speedup']:>8.2f}"
            f"{r['encode_support_latency_ms']:>10.1f}{r[served]:>9.0f}{train}{r['gflop_per_episode']:>8.1f}"
            f"{100 * r['matmul_peak_share']:>6.0f}"
            f"{_optional(r['single_pass_latency_ms'], 10, 1)}{_optional(r['test_time_passes_cost'], 9, 2)}"
            f"{r['peak_memory_mb']:>8.0f}"
        )


def _print_precision_rows(rows: list[dict], args) -> None:
    """With --dtype / --channels-last: each full episode against a float32 contiguous copy, timed interleaved."""
    if not _reduced(args):
        return
    layout = " channels_last" if args.channels_last else ""
    print(f"\n{args.dtype}{layout} against float32 (full episode, interleaved):")
    print(
        f"{'method':<13}{'size':<5}{'K':>2}{'fp32 ms':>9}{'ms':>9}{'x wall':>8}{'x cpu':>7}{'max|diff|':>11}{'agree %':>9}"
    )
    for r in rows:
        print(
            f"{r['model_type']:<13}{r['size']:<5}{r['shot']:>2}{r['full_float32_latency_ms']:>9.1f}"
            f"{r['full_latency_ms']:>9.1f}{r['speedup_vs_float32']:>8.2f}{r['cpu_speedup_vs_float32']:>7.2f}"
            f"{r['max_abs_logit_difference_vs_float32']:>11.1e}{100 * r['pixel_agreement_vs_float32']:>9.2f}"
        )


def _report_official(sources: dict[str, str], args, device) -> int:
    rows = [compare_official(m, folder, shot, args, device) for m, folder in sources.items() for shot in args.shots]
    print(
        f"{'method':<10}{'K':>3}{'size':>6}{'official ms':>13}{'hf_fss ms':>11}{'hf_fss/official':>17}"
        f"{'cpu ratio':>11}{'max|diff|':>11}{'agree %':>9}"
    )
    for r in rows:
        if "not_run" in r:
            print(f"{r['model_type']:<10}{r['shot']:>3}{r['image_size']:>6}  not run: {r['not_run']}")
            continue
        print(
            f"{r['model_type']:<10}{r['shot']:>3}{r['image_size']:>6}{r['official_latency_ms']:>13.1f}"
            f"{r['hf_fss_latency_ms']:>11.1f}{r['hf_fss_over_official']:>17.3f}{r['hf_fss_cpu_over_official']:>11.3f}"
            f"{r['max_abs_logit_difference']:>11.1e}{100 * r['pixel_agreement']:>9.2f}"
        )
    layout = " channels_last" if args.channels_last else ""
    print(
        f"hf_fss in {args.dtype}{layout}, the official code in float32; cpu ratio = hf_fss / official process CPU "
        f"time; max|diff| and agree % (argmax equal) against the official float32 logits; medians of "
        f"{args.iterations} interleaved pairs, {torch.get_num_threads()} threads, load {os.getloadavg()}"
    )
    _print_warmup_note(args.warmup)
    _write_record(args.output, device, rows)
    return 0 if any("not_run" not in r for r in rows) else 1


def _print_warmup_note(warmup: int) -> None:
    """With `--warmup 0` the first timed call of each row pays one-time costs (allocator growth, lazy init, cold
    caches) that later calls do not: with few iterations its ratios (reuse x, hf_fss/official) are not steady-state."""
    if warmup == 0:
        print(
            "warning: --warmup 0: the first timed call of each row includes one-time costs, so the times and the "
            "ratios between rows (reuse x, passes x, hf_fss/official) are not steady-state; use --warmup 1 or more"
        )


def _write_record(path: Path | None, device: torch.device, rows: list[dict], **extra) -> None:
    if path:
        record = {
            **extra,
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "load_average": os.getloadavg(),
            "results": rows,
        }
        atomic_write_text(path, json.dumps(record, indent=2))


if __name__ == "__main__":
    sys.exit(main())
