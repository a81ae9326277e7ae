#!/usr/bin/env bash
# The GPU check (docs/development.md, "GPU check"): every `gpu` test, then scripts/benchmark.py on CUDA for every
# method in fp32 and in bf16 + channels_last, rendered as the docs' GPU table.
#
#     bash scripts/gpu_check.sh                  # writes outputs/gpu_check/ (or $OUT/gpu_check/ when OUT is set)
#     GPU_CHECK_SIZES="tiny" bash scripts/gpu_check.sh   # the tiny models only (minutes less)
#
# Exits non-zero on the first failure: no CUDA device, a failed or skipped gpu test, a benchmark that fails or
# leaves a method not run. Run from the repository root with hf_fss installed (`pip install -e ".[test]"`).
set -euo pipefail

cd "$(dirname "$0")/.."
out_dir="${OUT:-outputs}/gpu_check"
sizes="${GPU_CHECK_SIZES:-tiny base}"

python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: error: no CUDA device (torch.cuda.is_available() is False)')"
mkdir -p "$out_dir"  # after the check: a machine without CUDA gets nothing written
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out_dir/gpu.txt" || true

# Every gpu-marked test; a skip here means the check did not run what it promises, so it fails the run.
python -m pytest -q -m gpu tests -p no:cacheprovider -rs --junitxml "$out_dir/pytest_gpu.xml" | tee "$out_dir/pytest_gpu.txt"
if grep -q 'skipped="[1-9]' "$out_dir/pytest_gpu.xml"; then
    echo "gpu_check.sh: error: gpu tests were skipped on a CUDA machine (see $out_dir/pytest_gpu.txt)" >&2
    exit 1
fi

# shellcheck disable=SC2086  # $sizes is a list of words
python scripts/benchmark.py --device cuda --sizes $sizes --iterations 10 --warmup 3 \
    --output "$out_dir/benchmark_fp32.json" | tee "$out_dir/benchmark_fp32.txt"
# shellcheck disable=SC2086
python scripts/benchmark.py --device cuda --sizes $sizes --iterations 10 --warmup 3 --dtype bfloat16 --channels-last \
    --output "$out_dir/benchmark_bf16_channels_last.json" | tee "$out_dir/benchmark_bf16_channels_last.txt"

python - "$out_dir" <<'EOF'
"""Render the two benchmark records as the docs' GPU table (gpu_table.md), one row per method, size and shot."""
import json
import sys
from datetime import date
from pathlib import Path

out = Path(sys.argv[1])
runs = {name: json.loads((out / f"benchmark_{name}.json").read_text()) for name in ("fp32", "bf16_channels_last")}
not_run = [r for run in runs.values() for r in run["results"] if "not_run" in r]
if not_run:
    sys.exit(f"gpu_check.sh: error: not run: {[(r['model_type'], r['not_run']) for r in not_run]}")
gpu = (out / "gpu.txt").read_text().strip() or runs["fp32"]["device"]
key = lambda r: (r["model_type"], r["size"], r["shot"])  # noqa: E731
bf16 = {key(r): r for r in runs["bf16_channels_last"]["results"]}
lines = [
    f"GPU check of {date.today().isoformat()} on {gpu}, torch {runs['fp32']['torch']} "
    "(`bash scripts/gpu_check.sh`; medians of 10 calls after 3 warm-up calls, batch 1, random weights).",
    "",
    "| method | size | px | K | fp32 ms | fp32 train ms | bf16+CL ms | bf16+CL train ms | fp32 / bf16+CL | peak MB (fp32) |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]
for r in runs["fp32"]["results"]:
    b = bf16[key(r)]
    train = lambda row: f"{row['training_step_latency_ms']:.1f}" if "training_step_latency_ms" in row else "-"  # noqa: E731
    lines.append(
        f"| {r['model_type']} | {r['size']} | {r['image_size']} | {r['shot']} | {r['full_latency_ms']:.1f} | {train(r)} "
        f"| {b['full_latency_ms']:.1f} | {train(b)} | {r['full_latency_ms'] / b['full_latency_ms']:.2f}x "
        f"| {r['peak_memory_mb']:.0f} |"
    )
(out / "gpu_table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "gpu_check.sh: all passed; table in $out_dir/gpu_table.md"
