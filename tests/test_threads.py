"""Default torch threads per process: the cores available divided by the processes on this machine."""

import os

import pytest
import torch

from hf_fss.evaluation.runner import build_parser
from hf_fss.utils import default_num_threads, set_num_threads


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "env, cores, expected",
    [
        ({}, 8, 8),
        ({"WORLD_SIZE": "2"}, 8, 4),
        ({"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}, 8, 2),  # two nodes of four: per machine
        ({"LOCAL_WORLD_SIZE": "4"}, 2, 1),  # never below one
        ({"WORLD_SIZE": ""}, 3, 3),
    ],
)
def test_cores_are_shared_between_the_processes_of_a_machine(monkeypatch, env, cores, expected):
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_num_threads() == expected


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3), ("0", 4), ("", 4), ("two", 4)])
def test_omp_num_threads_is_honoured_when_it_names_a_count(monkeypatch, value, expected):
    # `OMP_NUM_THREADS=1 python scripts/evaluate.py` must run one thread (1 and 2 processes then give identical
    # metrics); a value that names no positive count falls back to the cores shared among the processes.
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert default_num_threads() == expected


def test_set_num_threads_uses_the_flag_or_the_default(restore_threads, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert set_num_threads() == 1 and torch.get_num_threads() == 1
    assert set_num_threads(2) == 2 and torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="--num-threads must be >= 1, got 0"):
        set_num_threads(0)


def test_evaluate_exposes_num_threads():
    args = build_parser().parse_args(["--model", "m", "--dataset", "synthetic", "--num-threads", "3"])
    assert args.num_threads == 3
    assert build_parser().parse_args(["--model", "m", "--dataset", "synthetic"]).num_threads is None


THREAD_CASES = [
    (["--num-threads", "1"], {}, 1),
    ([], {"OMP_NUM_THREADS": "1"}, 1),
    (["--num-threads", "2"], {"OMP_NUM_THREADS": "1"}, 2),
]


def _threads_of_script(monkeypatch, module, entry: str, script: str, flags, env) -> list[int]:
    """Run `module.main()` as `script flags` under `env`, with `module.entry` replaced: the threads it ran with."""
    import sys

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    torch.set_num_threads(3)
    seen = []
    monkeypatch.setattr(module, entry, lambda loop_args, args: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(sys, "argv", [script, "--dataset", "synthetic", *flags])
    assert module.main() == 0
    return seen


@pytest.mark.parametrize("flags, env, expected", THREAD_CASES)
def test_train_runs_the_threads_of_its_flag_or_of_omp_num_threads(restore_threads, monkeypatch, flags, env, expected):
    # `OMP_NUM_THREADS=1 python scripts/train.py` / `--num-threads 1`: one thread (accelerate launch gives each
    # process OMP_NUM_THREADS=1 unless the flag says otherwise). From the command line, argv is None.
    from hf_fss.training import episodic

    assert _threads_of_script(monkeypatch, episodic, "train", "train.py", flags, env) == [expected]


@pytest.mark.parametrize("flags, env, expected", THREAD_CASES)
def test_pretrain_prior_runs_the_threads_of_its_flag_or_of_omp_num_threads(
    restore_threads, monkeypatch, flags, env, expected
):
    # scripts/pretrain_prior.py shares train.py's --num-threads (LoopArguments) and the same default.
    from hf_fss.pretraining import training

    assert _threads_of_script(monkeypatch, training, "pretrain", "pretrain_prior.py", flags, env) == [expected]
