"""`--dataset` resolution shared by the scripts."""

import datasets
import pytest

from hf_fss.data import load_benchmark


def test_synthetic_is_built_on_the_fly_and_a_saved_folder_loads_back(tmp_path):
    built = load_benchmark("synthetic", synthetic_seed=3, num_train=4, num_val=2, image_size=64)
    assert set(built) == {"train", "validation"} and built["train"].num_rows == 4
    built.save_to_disk(str(tmp_path / "bench"))
    loaded = load_benchmark(str(tmp_path / "bench"))
    assert isinstance(loaded, datasets.DatasetDict)
    assert loaded["validation"]["image_id"] == built["validation"]["image_id"]


def test_bad_dataset_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="not a DatasetDict written by save_to_disk"):
        load_benchmark(str(tmp_path))
    with pytest.raises(ValueError, match="neither 'synthetic', an existing folder, nor a Hub dataset id"):
        load_benchmark("no-such-thing")
