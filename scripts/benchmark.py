"""
Speed and memory of the hf_fss methods: episodes per second, latency, and the gain from encoding a support set once.

For every method and size it times, on the same random inputs in one run:
- `full`: `model(pixel_values, support_pixel_values, support_masks)`, one episode per call;
- `query_only`: `model(pixel_values, support_encoding=enc)` with `enc = model.encode_support(...)` computed once,
  what a support set costs when it serves many queries (the Space, the pipeline);
- `single_pass` (methods that declare `single_pass_overrides`, e.g. SMCP's second, pseudo-prototype pass): the full
  episode with those config values set, so `test_time_passes_cost` = full / single-pass time is the extra passes'
  cost.
Ratios between rows of one run are what to compare; absolute numbers depend on the machine and its load.

Per timed call (one episode at the default --batch-size 1) it records the median wall time and, from
`resource.getrusage(RUSAGE_SELF)` read just before and after the call (the whole process, all threads), the median
user and system CPU time and minor / major page faults: `*_latency_ms`, `*_user_ms`, `*_system_ms`,
`*_minor_faults`, `*_major_faults` for `full` and `query_only`. High system time with many minor faults usually
means large temporary tensors are mapped fresh from the OS on every call (and handed back after it).

    python scripts/benchmark.py                                  # every method, tiny and base sizes, CPU
    python scripts/benchmark.py --model-types ntrenet --sizes base --shots 1 5 --device cuda --output bench.json
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import hf_fss  # noqa: E402
from hf_fss.file_utils import atomic_write_text  # noqa: E402
from hf_fss.utils import set_num_threads  # noqa: E402

# Model sizes: `base` is the papers' configuration (each method's default backbone), `tiny` the one the tests use.
SIZES = {
    "base": {},
    "tiny": {"reduce_dim": 16},
}
# The tiny backbone of each backbone a method may default to.
TINY_BACKBONE_KWARGS = {
    "resnet50": {"base_width": 8, "depths": [1, 1, 1, 1]},
    "resnet101": {"base_width": 8, "depths": [1, 1, 1, 1]},
    "vgg16_bn": {"base_width": 8},
    "vgg16_dilated": {"base_width": 8},
}


def build_model(model_type: str, size: str, image_size: int, chunking: bool = True) -> torch.nn.Module:
    config_class, model_class = hf_fss.MODEL_CLASSES[model_type]
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    overrides = {k: v for k, v in SIZES[size].items() if k in defaults}
    if size == "tiny":
        overrides["backbone_kwargs"] = TINY_BACKBONE_KWARGS[defaults["backbone"]]
    config = config_class(image_size=image_size, chunk_extractors_on_cpu=chunking, **overrides)
    return model_class(config).eval()


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


def benchmark(model_type, size, shot, args, device) -> dict:
    model = build_model(model_type, size, args.image_size, args.chunking).to(device)
    query, support, masks = random_episode(args.batch_size, shot, args.image_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():  # as evaluation and the pipeline (a method may adapt to its supports inside)
        encoding = model.encode_support(support, masks)
        fns = {
            "full": lambda: model(query, support, masks),
            "query_only": lambda: model(query, support_encoding=encoding),
        }
        single_pass = single_pass_call(model, query, support, masks)
        if single_pass is not None:
            fns["single_pass"] = single_pass
        # Interleaved, so that the ratios (support reuse, extra passes) hold under a changing load.
        calls = measure_interleaved(fns, args.iterations, args.warmup, device)
    full, query_only, single = calls["full"], calls["query_only"], calls.get("single_pass")
    full_s, query_s = statistics.median(full["wall_s"]), statistics.median(query_only["wall_s"])
    single_s = statistics.median(single["wall_s"]) if single else None
    return {
        "model_type": model_type,
        "size": size,
        "shot": shot,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "chunk_extractors_on_cpu": args.chunking,
        "parameters": sum(p.numel() for p in model.parameters()),
        **summarize_calls("full", full),
        "full_episodes_per_s": args.batch_size / full_s,
        **summarize_calls("query_only", query_only),
        "query_only_episodes_per_s": args.batch_size / query_s,
        "support_reuse_speedup": full_s / query_s,
        "single_pass_latency_ms": None if single_s is None else 1000 * single_s,
        "test_time_passes_cost": None if single_s is None else full_s / single_s,
        "peak_memory_mb": peak_memory_mb(device),
    }


def _optional(value: float | None, width: int, decimals: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{decimals}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Columns: full ms / sys ms / minflt are the medians per full-episode call (wall time, process system "
        "CPU time, minor page faults); query ms the query-only call; reuse x = full ms / query ms; for a method whose "
        "test time takes several passes (it declares single_pass_overrides, e.g. SMCP's pseudo-prototype fusion), "
        "1-pass ms is the full episode with one pass and passes x = full ms / 1-pass ms.",
    )
    parser.add_argument(
        "--model-types", nargs="+", default=sorted(hf_fss.MODEL_CLASSES), choices=sorted(hf_fss.MODEL_CLASSES)
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=sorted(SIZES))
    parser.add_argument("--shots", nargs="+", type=int, default=[1])
    parser.add_argument("--image-size", type=int, default=473)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--num-threads",
        "--threads",
        dest="threads",
        type=int,
        default=None,
        help="torch threads (default: the cores available divided by the processes on this machine)",
    )
    parser.add_argument(
        "--no-chunking",
        dest="chunking",
        action="store_false",
        help="run frozen extractors over a stack of images in one call on CPU (chunk_extractors_on_cpu=False)",
    )
    parser.add_argument("--output", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if min(args.shots) < 1 or args.iterations < 1 or args.batch_size < 1:
        parser.error("--shots, --iterations and --batch-size must be >= 1")
    set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = [
        benchmark(model_type, size, shot, args, device)
        for model_type in args.model_types
        for size in args.sizes
        for shot in args.shots
    ]
    header = (
        f"{'method':<14}{'size':<6}{'K':>3}{'params':>12}{'full ms':>10}{'sys ms':>8}{'minflt':>9}{'ep/s':>8}"
        f"{'query ms':>10}{'sys ms':>8}{'minflt':>9}{'reuse x':>9}{'1-pass ms':>11}{'passes x':>10}{'peak MB':>9}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['model_type']:<14}{r['size']:<6}{r['shot']:>3}{r['parameters']:>12,}{r['full_latency_ms']:>10.1f}"
            f"{r['full_system_ms']:>8.1f}{r['full_minor_faults']:>9.0f}{r['full_episodes_per_s']:>8.2f}"
            f"{r['query_only_latency_ms']:>10.1f}{r['query_only_system_ms']:>8.1f}{r['query_only_minor_faults']:>9.0f}"
            f"{r['support_reuse_speedup']:>9.2f}{_optional(r['single_pass_latency_ms'], 11, 1)}"
            f"{_optional(r['test_time_passes_cost'], 10, 2)}{r['peak_memory_mb']:>9.0f}"
        )
    if args.output:
        record = {
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "load_average": os.getloadavg(),
            "results": rows,
        }
        atomic_write_text(args.output, json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
