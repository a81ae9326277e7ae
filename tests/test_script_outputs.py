"""
Issue 22, kinds 4 and 5, for the scripts besides train.py / pretrain_prior.py: evaluate.py, compare.py,
prepare_dataset.py and benchmark.py hold their output while they write it (a second run is refused naming the
first; a finished or failed run leaves no lock behind), and every script with an output path checks it before the
work (a file where a folder goes or the reverse, a place one may not write) and reports an operating-system error
(a full disk) in one line with exit status 2, the earlier output intact.

Tests run as root, where chmod does not stop writes: an unwritable place is simulated with a patched `os.access`,
a full disk with a write that raises OSError(ENOSPC).
"""

import contextlib
import errno
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import single_thread

from hf_fss import FewShotSegmentationImageProcessor
from hf_fss.data.builders import prepare
from hf_fss.evaluation import cli as evaluate_cli
from hf_fss.evaluation import compare, runner
from hf_fss.file_utils import LOCK_NAME, OutputLock
from hf_fss.models.ntrenet import NTRENetConfig, NTRENetModel

ROOT = Path(__file__).resolve().parents[1]
DATA = ["--dataset", "synthetic", "--synthetic-num-train", "0", "--synthetic-num-val", "60",
        "--synthetic-image-size", "128", "--num-threads", "1"]  # fmt: skip
SYNTHETIC = ["synthetic", "--num-train", "3", "--num-val", "2", "--image-size", "32"]

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _script(name: str):
    """A script of scripts/ as a module (loaded from its path: scripts/evaluate.py would shadow `evaluate`)."""
    spec = importlib.util.spec_from_file_location(f"hf_fss_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0]


def _exit_status(call) -> int:
    """The status of a `main` that returns it or exits through argparse (`SystemExit`)."""
    try:
        return call()
    except SystemExit as exit_info:
        return exit_info.code


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "tiny-ntrenet"
    config = NTRENetConfig(backbone_kwargs={"base_width": 8, "depths": [1, 1, 1, 1]}, reduce_dim=16,
                           background_prototype_dim=16, pyramid_bins=[1.0, 0.5], image_size=65)  # fmt: skip
    NTRENetModel(config).save_pretrained(folder)
    FewShotSegmentationImageProcessor(image_size=65).save_pretrained(folder)
    return folder


def _evaluate(model, out, *flags):
    return runner.main(["--model", str(model), *DATA, "--num-episodes", "2", "--output", str(out), *flags])


# ------------------------------------------------------------------------------------------------ the lock itself


def test_the_lock_leaves_nothing_and_is_taken_once(tmp_path):
    said = []
    target = tmp_path / "new" / "metrics.json"
    with contextlib.ExitStack() as held:
        lock = OutputLock(target, "--output", beside=True)
        held.enter_context(lock.acquire(say=said.append))  # entering again must not take it over from itself
        assert sorted(p.name for p in target.parent.iterdir()) == [f".metrics.json{LOCK_NAME}",
                                                                   f".metrics.json{LOCK_NAME}.json"]  # fmt: skip
        with pytest.raises(ValueError, match=r"--output '.*metrics.json' is in use by another run \(pid \d+ on "):
            OutputLock(target, "--output", beside=True).acquire()
    assert said == []
    assert not (tmp_path / "new").exists()  # the folder it made, empty again, is gone too
    with OutputLock(tmp_path / "out"):  # a folder's lock: inside it
        assert (tmp_path / "out" / LOCK_NAME).exists()
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ runs that mix

_HOLD = textwrap.dedent(
    """
    import sys, time
    from hf_fss.file_utils import OutputLock
    with OutputLock(sys.argv[1], sys.argv[2], beside=sys.argv[3] == "beside"):
        print("held", flush=True)
        time.sleep(120)
    """
)


@contextlib.contextmanager
def _held(target: Path, flag: str, beside: bool):
    """Another process holding `target` as a running script would; yields its pid."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", _HOLD, str(target), flag, "beside" if beside else "inside"]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_evaluate_into_an_output_another_run_writes_is_refused(tiny_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "metrics.json"
    monkeypatch.setattr(evaluate_cli, "evaluate_model", lambda *a, **k: pytest.fail("evaluated despite the lock"))
    with _held(out, "--output", beside=True) as pid:
        assert _evaluate(tiny_model, out) == 2
        line = _one_line(capsys.readouterr().err, "evaluate.py")
        assert (
            f"--output '{out}' is in use by another run (pid {pid} on " in line and "choose another --output" in line
        )
        assert not out.exists()


def test_compare_into_a_folder_another_run_writes_is_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    with _held(out, "--output-dir", beside=False) as pid:
        argv = ["--models", "a", "b", *DATA, "--output-dir", str(out)]
        assert compare.main(argv) == 2
        assert f"is in use by another run (pid {pid} on " in _one_line(capsys.readouterr().err, "compare.py")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, f"{LOCK_NAME}.json"]  # the first run's only


def test_two_builds_into_one_dataset_folder_do_not_replace_each_other(tmp_path, capsys):
    pytest.importorskip("hf_fss.data.synthetic")
    out = tmp_path / "data"
    with _held(out, "--output-dir", beside=True) as pid:
        assert prepare.main([*SYNTHETIC, "--output-dir", str(out)]) == 2
        line = _one_line(capsys.readouterr().err, "prepare_dataset.py")
        assert f"--output-dir '{out}' is in use by another run (pid {pid} on " in line
        assert not out.exists()
    assert prepare.main([*SYNTHETIC, "--output-dir", str(out)]) == 0  # free again, and nothing left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_benchmark_into_a_file_another_run_writes_is_refused(tmp_path, capsys):
    benchmark = _script("benchmark")
    out = tmp_path / "bench.json"
    with _held(out, "--output", beside=True) as pid:
        argv = ["--model-types", "cosine_prior", "--sizes", "tiny", "--iterations", "1", "--output", str(out)]
        assert _exit_status(lambda: benchmark.main(argv)) == 2
        assert f"is in use by another run (pid {pid} on " in _one_line(capsys.readouterr().err, "benchmark.py")
        assert not out.exists()


# ------------------------------------------------------------------------------------------------ OS errors


def test_evaluate_output_that_is_a_folder_is_refused_before_evaluating(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        evaluate_cli, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before the output check")
    )
    folder = tmp_path / "metrics.json"
    folder.mkdir()
    assert _evaluate(tiny_model, folder) == 2
    assert f"--output '{folder}' is a folder; give a file path" in _one_line(capsys.readouterr().err, "evaluate.py")
    assert list(folder.iterdir()) == []


def test_evaluate_output_that_is_a_device_or_fifo_is_refused_and_left_as_it_is(
    tiny_model, tmp_path, capsys, monkeypatch
):
    """`--output /dev/null` (run as root) replaced the device with a JSON file through the atomic rename."""
    import stat

    from hf_fss.utils.io import atomic_write_text

    monkeypatch.setattr(
        evaluate_cli, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before the output check")
    )
    fifo = tmp_path / "results"
    os.mkfifo(fifo)
    assert _evaluate(tiny_model, fifo) == 2
    assert f"--output '{fifo}' is not a regular file or folder" in _one_line(capsys.readouterr().err, "evaluate.py")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and sorted(tmp_path.iterdir()) == [fifo]
    with pytest.raises(OSError, match="not a regular file, so it is not replaced"):
        atomic_write_text(fifo, "{}")  # the writers themselves never replace one either
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_evaluate_output_one_may_not_write_is_refused_first(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        evaluate_cli, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before the output check")
    )
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != tmp_path)
    assert _evaluate(tiny_model, tmp_path / "sub" / "metrics.json") == 2
    line = _one_line(capsys.readouterr().err, "evaluate.py")
    assert f"--output '{tmp_path / 'sub' / 'metrics.json'}': '{tmp_path}' is not writable by you" in line
    assert list(tmp_path.iterdir()) == []


def test_evaluate_full_disk_keeps_the_earlier_metrics(tiny_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "metrics.json"
    out.write_text('{"miou": 0.5}\n')

    def full_disk(data, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(evaluate_cli, "write_json_atomic", full_disk)
    assert _evaluate(tiny_model, out) == 2
    line = _one_line(capsys.readouterr().err, "evaluate.py")
    assert line == f"evaluate.py: error: {out}: the disk is full: free some space or choose another folder"
    assert out.read_text() == '{"miou": 0.5}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # the lock is released


def test_evaluate_full_disk_at_the_lock_record_leaves_no_lock(tiny_model, tmp_path, capsys, monkeypatch):
    """A full tmpfs has room for the empty lock file but not for its holder record: the refusal left the lock file."""
    from hf_fss.utils import io

    write = io.atomic_write_text

    def full_disk_for_the_record(path, text):
        if Path(path).name.endswith(f"{LOCK_NAME}.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, text)

    monkeypatch.setattr(io, "atomic_write_text", full_disk_for_the_record)
    assert _evaluate(tiny_model, tmp_path / "m.json") == 2
    assert "the disk is full: free some space" in _one_line(capsys.readouterr().err, "evaluate.py")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where no file can be created")
def test_evaluate_output_where_no_file_can_be_created_is_not_in_use(tiny_model, capsys):
    """filelock reports a lock file it cannot create as a timeout; that was shown as 'in use by another run'."""
    assert _evaluate(tiny_model, "/proc/x.json") == 2
    line = _one_line(capsys.readouterr().err, "evaluate.py")
    assert "in use" not in line and "/proc/.x.json" in line and "choose a folder you may write" in line, line


def test_compare_output_dir_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.write_text("notes")
    assert compare.main(["--models", "a", "b", *DATA, "--output-dir", str(out)]) == 2
    assert f"--output-dir '{out}' is a file; give a folder path" in _one_line(capsys.readouterr().err, "compare.py")
    assert out.read_text() == "notes"


def test_prepare_dataset_unwritable_place_and_full_disk(tmp_path, capsys, monkeypatch):
    pytest.importorskip("hf_fss.data.synthetic")
    out = tmp_path / "data"
    with monkeypatch.context() as patched:
        patched.setattr(os, "access", lambda path, mode, **kw: Path(path) != tmp_path)
        assert prepare.main([*SYNTHETIC, "--output-dir", str(out)]) == 2
    assert "is not writable by you; choose a folder you may write" in _one_line(
        capsys.readouterr().err, "prepare_dataset.py"
    )
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    (out / "old.txt").write_text("previous build")

    def full_disk(self, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "data-00000-of-00001.arrow"))

    monkeypatch.setattr(prepare.DatasetDict, "save_to_disk", full_disk)
    assert prepare.main([*SYNTHETIC, "--output-dir", str(out), "--overwrite"]) == 2
    line = _one_line(capsys.readouterr().err, "prepare_dataset.py")
    assert "data-00000-of-00001.arrow: the disk is full: free some space or choose another folder" in line
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "previous build"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder, no lock


def test_benchmark_output_checks_and_full_disk(tmp_path, capsys, monkeypatch):
    benchmark = _script("benchmark")
    folder = tmp_path / "bench.json"
    folder.mkdir()
    argv = ["--model-types", "cosine_prior", "--sizes", "tiny", "--iterations", "1", "--warmup", "0",
            "--no-training", "--image-size", "33"]  # fmt: skip
    monkeypatch.setattr(benchmark, "benchmark", lambda *a, **k: pytest.fail("timed before the output check"))
    assert _exit_status(lambda: benchmark.main([*argv, "--output", str(folder)])) == 2
    assert "is a folder; give a file path" in _one_line(capsys.readouterr().err, "benchmark.py")
    monkeypatch.undo()

    out = tmp_path / "old.json"
    out.write_text("{}")

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(benchmark, "atomic_write_text", full_disk)
    assert _exit_status(lambda: benchmark.main([*argv, "--output", str(out)])) == 2
    assert f"{out}: the disk is full" in _one_line(capsys.readouterr().err, "benchmark.py")
    assert out.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "old.json"]


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ('{"reduce_dim": -1}', "--model-kwargs: ntrenet (tiny) refuses it: reduce_dim must be positive, got -1"),
        ('{"reduce_dim": "x"}', "Field 'reduce_dim' expected int"),
        ('{"image_size": 64}', "--model-kwargs 'image_size': set it with --image-size instead"),
    ],
)
def test_benchmark_model_kwargs_a_config_refuses_is_one_line(tmp_path, kwargs, expected):
    out = tmp_path / "bench.json"
    argv = ["--model-types", "ntrenet", "--sizes", "tiny", "--model-kwargs", kwargs, "--output", str(out)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *argv], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert expected in _one_line(result.stderr, "benchmark.py")
    assert not out.exists()


def test_convert_output_dir_that_is_a_file_is_refused_before_converting(tmp_path, capsys):
    convert = _script("convert_original_checkpoint")
    checkpoint, out = tmp_path / "x.pth", tmp_path / "out"
    torch.save({"state_dict": {}}, checkpoint)
    out.write_text("notes")
    argv = ["--model-type", "ntrenet", "--checkpoint", str(checkpoint), "--output-dir", str(out)]
    assert convert.main(argv) == 2
    line = _one_line(capsys.readouterr().err, "convert_original_checkpoint.py")
    assert f"--output-dir '{out}' is a file; give a folder path" in line
    assert out.read_text() == "notes"


def test_visualize_output_checks_and_full_disk(tmp_path, capsys, monkeypatch):
    pytest.importorskip("hf_fss.data.synthetic")
    visualize = _script("visualize_episodes")
    folder = tmp_path / "sheet.png"
    folder.mkdir()
    monkeypatch.setattr(visualize, "build_synthetic", lambda **k: pytest.fail("built before the output check"))
    assert _exit_status(lambda: visualize.main(["--output", str(folder)])) == 2
    assert "is a folder; give a file path" in _one_line(capsys.readouterr().err, "visualize_episodes.py")
    monkeypatch.undo()

    out = tmp_path / "old.png"
    out.write_bytes(b"earlier sheet")

    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(visualize.Image.Image, "save", full_disk)
    argv = ["--output", str(out), "--num-images", "1", "--num-episodes", "1", "--fold", "1", "--seed", "1"]
    assert _exit_status(lambda: visualize.main(argv)) == 2  # too few images for an episode: one line, no traceback
    assert "eligible images" in _one_line(capsys.readouterr().err, "visualize_episodes.py")
    argv[argv.index("--num-images") + 1] = "80"
    assert _exit_status(lambda: visualize.main(argv)) == 2
    assert "the disk is full" in _one_line(capsys.readouterr().err, "visualize_episodes.py")
    assert out.read_bytes() == b"earlier sheet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png", "sheet.png"]  # no temporary file left
