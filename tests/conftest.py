import os

import pytest
import torch

# Tests never reach the network: Hub look-ups must be answered from the local cache or fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TINY_RESNET = {"base_width": 8, "depths": [1, 1, 1, 1]}
# Tiny transformers backbones (built with AutoBackbone.from_config, random weights): DINOv2 with a 14-pixel patch
# (its grid is resized to the methods' stride-8 grid) and transformers' own ResNet (native strides 4 .. 32).
TINY_DINOV2 = {"model_type": "dinov2", "hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
               "intermediate_size": 32, "patch_size": 14, "image_size": 28}  # fmt: skip
TINY_HF_RESNET = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16, 16, 16], "depths": [1, 1, 1, 1],
                  "layer_type": "basic"}  # fmt: skip
# The small NTRENet head the evaluation-cache, compare and SegGPT script tests share (with a tiny backbone).
TINY_NTRENET_HEAD = {"reduce_dim": 16, "background_prototype_dim": 16, "pyramid_bins": (1.0, 0.5)}
TINY_CONVNEXT = {"model_type": "convnext", "hidden_sizes": [8, 16, 16, 16], "depths": [1, 1, 1, 1]}
# transformers' SegGptConfig of 4 layers of width 32 on two stacked 32 x 32 images (the SegGPT adapter's tests).
TINY_SEGGPT = {
    "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "image_size": [64, 32], "patch_size": 8,
    "pretrain_image_size": 16, "decoder_hidden_size": 8, "merge_index": 1, "intermediate_hidden_state_indices": [1, 3],
    "drop_path_rate": 0.0,
}  # fmt: skip


def gpu_skip_reason() -> str | None:
    """Why `gpu`-marked tests are skipped here, or None where they run: exactly when CUDA is unavailable."""
    return None if torch.cuda.is_available() else "needs a CUDA device (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    if reason is not None:
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def no_onednn():
    """
    The native CPU conv kernels instead of oneDNN for a whole test module (`pytestmark =
    pytest.mark.usefixtures("no_onednn")`): oneDNN sets up a kernel for every new conv shape, which costs more than
    the tiny convs of the test models themselves; the native kernels make the training tests several times cheaper.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state, as a new launch would (several runs share one test process)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    reset_accelerate()
    yield
    reset_accelerate()


def random_episode(batch_size=2, shot=1, size=65, generator=None, width=None):
    """Random normalised images and masks with a target rectangle in every support; `width` makes them non-square."""
    g = generator or torch.Generator().manual_seed(0)
    height, width = size, width or size
    query = torch.randn(batch_size, 3, height, width, generator=g)
    support = torch.randn(batch_size, shot, 3, height, width, generator=g)
    masks = torch.zeros(batch_size, shot, height, width, dtype=torch.long)
    masks[..., height // 4 : height // 2, width // 4 : 3 * width // 4] = 1
    masks[..., -3:, :] = 255
    labels = torch.zeros(batch_size, height, width, dtype=torch.long)
    labels[:, height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = 1
    return query, support, masks, labels


def single_thread():
    """
    One torch thread for the duration (a generator for fixtures): tiny models gain nothing from intra-op threads on
    a shared 2-core machine, spinning OpenMP threads slow them down a lot (CRCNet's loops 20x), and one thread is what
    `accelerate launch` gives each process. A test module runs all its tests so with
    `_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


one_thread = pytest.fixture(single_thread)
