"""`import hf_fss` loads what the call needs (docs/development.md, "Import time"), and every public name still works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Heavy optional parts `import hf_fss` must not load: they are imported by the call that needs them.
HEAVY = [
    "accelerate",
    "datasets",
    "gradio",
    "matplotlib",
    "pycocotools",
    "scipy.ndimage",
    "skimage",
    "albumentations",
    "transformers.modeling_utils",
    "transformers.image_processing_utils",
    "transformers.pipelines",
    "torch._dynamo",
]


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout


def test_import_hf_fss_loads_no_heavy_optional_part():
    code = f"import json, sys, hf_fss; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    assert json.loads(run_python(code)) == []


def test_import_hf_fss_loads_neither_torch_nor_transformers():
    # Both are imported when a name or an Auto class is first used (hf_fss/__init__.py).
    code = "import json, sys, hf_fss; print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))"
    assert json.loads(run_python(code)) == []


# The orders in which a user meets hf_fss and transformers' Auto classes; each must end with every registration made.
IMPORT_ORDERS = {
    "hf_fss first": "import hf_fss\nfrom transformers import AutoConfig, AutoModel",
    # modeling_auto imports configuration_auto: the configs are registered inside that nested import.
    "AutoModel before AutoConfig": "import hf_fss\nfrom transformers import AutoModel\nfrom transformers import AutoConfig",
    "transformers first": "from transformers import AutoConfig, AutoModel\nimport hf_fss",
    # hf_fss.models imports transformers' SegGptConfig (which reads modeling_auto) only on use.
    "a config first": "from hf_fss import SegGptFssConfig\nfrom transformers import AutoConfig, AutoModel",
    "a modeling file first": "from hf_fss.models.ntrenet.modeling_ntrenet import NTRENetModel\n"
    "from transformers import AutoConfig, AutoModel",
    "the processor first": "import hf_fss\nfrom transformers import AutoImageProcessor, AutoConfig, AutoModel",
    "transformers' SegGptConfig first": "from transformers import SegGptConfig\nimport hf_fss\n"
    "from transformers import AutoConfig, AutoModel",
    "the pipelines first": "import transformers.pipelines\nimport hf_fss\nfrom transformers import AutoConfig, AutoModel",
    # transformers' SegGPT processor imports image_processing_auto: hf_fss's imports it only on use.
    "the SegGPT processor first": "from hf_fss import SegGptFssImageProcessor\n"
    "from transformers import AutoImageProcessor, AutoConfig, AutoModel",
}


@pytest.mark.parametrize("imports", IMPORT_ORDERS.values(), ids=IMPORT_ORDERS.keys())
def test_the_auto_classes_are_registered_whatever_the_import_order(imports):
    code = (
        "import warnings\n"
        "warnings.simplefilter('error', RuntimeWarning)  # a registration that could not run warns: a failure here\n"
        f"{imports}\n"
        "import hf_fss\n"
        "assert type(AutoModel.from_config(AutoConfig.for_model('smcp', **{'backbone_kwargs': {'base_width': 8}}))) "
        "is hf_fss.SMCPModel\n"
        "assert AutoConfig.for_model('fss_run').__class__ is hf_fss.RunFolderConfig\n"
        "from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING\n"
        "assert IMAGE_PROCESSOR_MAPPING[hf_fss.SegGptFssConfig]['pil'] is hf_fss.SegGptFssImageProcessor\n"
        "print('ok')"
    )
    assert run_python(code).strip() == "ok"


def test_a_reload_keeps_one_watch_per_module_and_every_registration():
    # importlib.reload (Jupyter's %autoreload) runs hf_fss/__init__.py again before transformers' auto modules exist.
    code = (
        "import importlib, sys, hf_fss\n"
        "import hf_fss.utils.lazy as lazy\n"
        "importlib.reload(hf_fss); importlib.reload(lazy); importlib.reload(hf_fss)\n"
        "watched = [f.hf_fss_after_import for f in sys.meta_path if hasattr(f, 'hf_fss_after_import')]\n"
        "assert len(watched) == len(set(watched)) == 4, watched  # the four transformers modules\n"
        "from transformers import AutoConfig, AutoModel\n"
        "assert type(AutoModel.from_config(AutoConfig.for_model('cosine_prior'))) is hf_fss.CosinePriorModel\n"
        "print('ok')"
    )
    assert run_python(code).strip() == "ok"


def test_the_auto_model_stand_in_answers_for_the_real_class():
    code = (
        "import pickle, hf_fss\n"
        "from transformers import AutoConfig, AutoModel\n"
        "from transformers.models.auto.modeling_auto import MODEL_MAPPING\n"
        "stand_in = MODEL_MAPPING[hf_fss.CosinePriorConfig]\n"
        "assert type(stand_in) is not type and 'transformers.modeling_utils' not in sys.modules\n"
        "model = AutoModel.from_config(AutoConfig.for_model('cosine_prior'))\n"
        "assert MODEL_MAPPING[hf_fss.CosinePriorConfig] is hf_fss.CosinePriorModel  # the real class in its place\n"
        "assert isinstance(model, stand_in) and issubclass(hf_fss.CosinePriorModel, stand_in)\n"
        "assert pickle.loads(pickle.dumps(stand_in)) is hf_fss.CosinePriorModel\n"
        "print('ok')"
    ).replace("import pickle, hf_fss", "import pickle, sys, hf_fss")
    assert run_python(code).strip() == "ok"


def test_another_thread_never_sees_the_auto_classes_without_hf_fss(tmp_path):
    # Thread A imports transformers.pipelines (configuration_auto comes in early in it); thread B uses AutoConfig as
    # soon as configuration_auto is in sys.modules. The registration runs inside configuration_auto's import, whose
    # module lock B waits on, so B sees the entries whatever the timing.
    code = (
        "import sys, threading, time, hf_fss\n"
        "found = []\n"
        "def b():\n"
        "    while 'transformers.models.auto.configuration_auto' not in sys.modules:\n"
        "        time.sleep(0.001)\n"
        "    from transformers.models.auto.configuration_auto import AutoConfig\n"
        "    found.append(type(AutoConfig.for_model('ntrenet')).__name__)\n"
        "threads = [threading.Thread(target=b), threading.Thread(target=lambda: __import__('transformers.pipelines'))]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(found)"
    )
    assert run_python(code).strip() == "['NTRENetConfig']"


def test_a_failing_callback_never_fails_the_import_and_is_tried_again(tmp_path, monkeypatch):
    # E.g. another thread is half-way through importing what the callback needs: the user's import must succeed.
    from hf_fss.utils.lazy import after_import

    for name in ("fss_watched_first", "fss_watched_second"):
        (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []

    def register():
        calls.append(len(calls))
        if len(calls) == 1:
            raise ImportError("cannot import name 'X' from partially initialized module 'y'")

    after_import("fss_watched_first", register)
    with pytest.warns(RuntimeWarning, match="register could not run yet .*partially initialized.* tried again"):
        import fss_watched_first  # noqa: F401
    assert calls == [0]
    after_import("fss_watched_second", lambda: None)
    import fss_watched_second  # noqa: F401

    assert calls == [0, 1]  # retried after the next watched import, and succeeded


def test_evaluate_help_loads_no_model_code():
    # `scripts/evaluate.py --help` and a typo'd flag answer before the models, datasets and accelerate are imported.
    code = (
        "import json, runpy, sys\n"
        "sys.argv = ['evaluate.py', '--help']\n"
        "try:\n    runpy.run_path('scripts/evaluate.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert json.loads(run_python(code).splitlines()[-1]) == []


def test_every_exported_name_resolves_and_auto_classes_are_registered():
    import hf_fss

    for name in hf_fss.__all__:
        assert getattr(hf_fss, name) is not None, name
    assert set(hf_fss.__all__) <= set(dir(hf_fss))
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchModel'"):
        hf_fss.NoSuchModel  # noqa: B018
    code = (
        "import hf_fss\n"
        "from transformers import AutoConfig, AutoImageProcessor, AutoModel, pipeline\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "model = AutoModel.from_config(AutoConfig.for_model('cosine_prior'))\n"
        "assert type(model) is hf_fss.CosinePriorModel, type(model)\n"
        "assert AutoModel.from_config(hf_fss.NTRENetConfig()).__class__ is hf_fss.NTRENetModel\n"
        "from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING\n"
        "assert IMAGE_PROCESSOR_MAPPING[hf_fss.SMCPConfig]['pil'] is hf_fss.FewShotSegmentationImageProcessor\n"
        "assert PIPELINE_REGISTRY.supported_tasks['few-shot-segmentation']['impl'] is hf_fss.FewShotSegmentationPipeline\n"
        "print('ok')"
    )
    assert run_python(code).strip() == "ok"


def test_the_registry_keys_cost_no_model_import():
    code = (
        "import sys, hf_fss\n"
        "assert sorted(hf_fss.MODEL_CLASSES) == ['cosine_prior', 'crcnet', 'ntrenet', 'qgnet', 'seggpt_fss', 'smcp']\n"
        "assert 'ntrenet' in hf_fss.MODEL_CLASSES and 'transformers.modeling_utils' not in sys.modules\n"
        "config_class, model_class = hf_fss.MODEL_CLASSES['qgnet']\n"
        "assert model_class is hf_fss.QGNetModel and config_class is hf_fss.QGNetConfig\n"
        "print('ok')"
    )
    assert run_python(code).strip() == "ok"


def test_a_pipeline_module_imported_before_hf_fss_gets_the_task_too():
    code = (
        "import transformers.pipelines as p\n"
        "import hf_fss\n"
        "assert p.PIPELINE_REGISTRY.supported_tasks['few-shot-segmentation']['impl'] is hf_fss.FewShotSegmentationPipeline\n"
        "print('ok')"
    )
    assert run_python(code).strip() == "ok"
