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

# Model sizes: `base` is the papers' ResNet-50 configuration, `tiny` the one the tests use.
SIZES = {
    "base": {},
    "tiny": {"backbone_kwargs": {"base_width": 8, "depths": [1, 1, 1, 1]}, "reduce_dim": 16},
}


def build_model(
    model_type: str, size: str, image_size: int, chunking: bool = True, model_kwargs: dict | None = None
) -> torch.nn.Module:
    config_class, model_class = hf_fss.MODEL_CLASSES[model_type]
    known = {f.name for f in dataclasses.fields(config_class)}
    # `--model-kwargs` fields apply to the methods whose config has them (e.g. CRCNet's `shot_fusion`).
    overrides = {k: v for k, v in {**SIZES[size], **(model_kwargs or {})}.items() if k in known}
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


def measure_calls(fn, iterations: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """
    Per call, after `warmup` untimed calls: `wall_s` (seconds), and the process's `user_s` / `system_s` CPU seconds and
    `minor_faults` / `major_faults` (deltas of `resource.getrusage(RUSAGE_SELF)` around the call).
    """
    for _ in range(warmup):
        fn()
    calls = {"wall_s": [], "user_s": [], "system_s": [], "minor_faults": [], "major_faults": []}
    for _ in range(iterations):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        usage = _process_usage()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        after = _process_usage()
        calls["wall_s"].append(wall)
        for name, before_value, after_value in zip(
            ("user_s", "system_s", "minor_faults", "major_faults"), usage, after
        ):
            calls[name].append(after_value - before_value)
    return calls


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


def benchmark(model_type, size, shot, args, device) -> dict:
    model = build_model(model_type, size, args.image_size, args.chunking, args.model_kwargs).to(device)
    query, support, masks = random_episode(args.batch_size, shot, args.image_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():  # as evaluation and the pipeline (a method may adapt to its supports inside)
        full = measure_calls(lambda: model(query, support, masks), args.iterations, args.warmup, device)
        # Encoding a support set alone: where a method that adapts to its supports (CRCNet's K-shot finetuning)
        # spends its per-support-set time.
        encode = measure_calls(lambda: model.encode_support(support, masks), args.iterations, args.warmup, device)
        encoding = model.encode_support(support, masks)
        query_only = measure_calls(
            lambda: model(query, support_encoding=encoding), args.iterations, args.warmup, device
        )
    full_s, query_s = statistics.median(full["wall_s"]), statistics.median(query_only["wall_s"])
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
        **summarize_calls("encode_support", encode),
        "peak_memory_mb": peak_memory_mb(device),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Columns: full ms / sys ms / minflt are the medians per full-episode call (wall time, process system "
        "CPU time, minor page faults); query ms the query-only call; reuse x = full ms / query ms; encode ms the "
        "support encoding alone (CRCNet: its K-shot finetuning).",
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
    parser.add_argument(
        "--model-kwargs",
        type=json.loads,
        default=None,
        help="JSON object of config fields, applied to each method whose config has them, e.g. "
        '\'{"shot_fusion": "average", "finetune_steps": 50}\'',
    )
    parser.add_argument("--output", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.model_kwargs:
        fields = set().union(
            *({f.name for f in dataclasses.fields(hf_fss.MODEL_CLASSES[m][0])} for m in args.model_types)
        )
        unknown = sorted(set(args.model_kwargs) - fields)
        if unknown:
            parser.error(f"--model-kwargs {unknown}: no selected method's config has these fields")
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
        f"{'query ms':>10}{'sys ms':>8}{'minflt':>9}{'reuse x':>9}{'encode ms':>11}{'peak MB':>9}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['model_type']:<14}{r['size']:<6}{r['shot']:>3}{r['parameters']:>12,}{r['full_latency_ms']:>10.1f}"
            f"{r['full_system_ms']:>8.1f}{r['full_minor_faults']:>9.0f}{r['full_episodes_per_s']:>8.2f}"
            f"{r['query_only_latency_ms']:>10.1f}{r['query_only_system_ms']:>8.1f}{r['query_only_minor_faults']:>9.0f}"
            f"{r['support_reuse_speedup']:>9.2f}{r['encode_support_latency_ms']:>11.1f}{r['peak_memory_mb']:>9.0f}"
        )
    if args.output:
        record = {
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "load_average": os.getloadavg(),
            "model_kwargs": args.model_kwargs,
            "results": rows,
        }
        atomic_write_text(args.output, json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
