"""
Lazy imports, so that `import hf_fss` costs what its caller uses (docs/development.md, "Import time").

`transformers.modeling_utils` alone costs about 3.5 s of CPU at import (it pulls in `torch._dynamo` and
`torch.distributed.tensor`), `transformers.image_processing_utils` as much (it imports the former), while the
configuration classes need only `transformers.configuration_utils` (about 1.5 s, torch included). Three tools keep
the heavy parts out of `import hf_fss` and every public name working:

- `lazy_exports`: a module `__getattr__` (PEP 562) that imports a name's submodule on first access;
- `lazy_class`: a stand-in class for transformers' Auto mappings that imports the real class on first use;
- `after_import`: run a callback once a module has been imported (or now, if it already has been), e.g. register
  the pipeline task when `transformers.pipelines` is imported, since `pipeline()` cannot run before that.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Mapping

__all__ = ["after_import", "lazy_class", "lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """
    Module-level `__getattr__` and `__dir__` for `package` that import `exports[name]` (a module path relative to
    `package`, e.g. `".modeling_ntrenet"`) when `name` is first read, and keep the value in the module.

    Use: `__getattr__, __dir__ = lazy_exports(__name__, {"NTRENetModel": ".modeling_ntrenet"})`. An unknown name
    raises `AttributeError` as a plain module does (so `hasattr` and `from package import missing` behave).
    """

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)  # later reads are plain attribute reads
        return value

    def __dir__() -> list:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


class _LazyClassType(type):
    """Metaclass of `lazy_class` stand-ins: what the stand-in itself lacks is read from the real class."""

    def __getattr__(cls, name: str) -> object:
        if name.startswith("__"):  # probes by copy / pickle / inspect must not import the model code
            raise AttributeError(name)
        return getattr(cls.resolve(), name)

    def __call__(cls, *args, **kwargs):
        return cls.resolve()(*args, **kwargs)


def lazy_class(module: str, name: str, on_resolve: Callable[[type], None] | None = None, **known) -> type:
    """
    A class standing in for `module.name` until it is used: reading an attribute it does not hold (`from_pretrained`,
    `_from_config`, ...) or calling it imports `module` and forwards to the real class; `on_resolve(real)` is called
    once then (e.g. to register the real class in place of the stand-in). `known` are attributes answered without the
    import (e.g. `config_class`, which `AutoModel.register` reads).
    """
    resolved: list[type] = []

    def resolve() -> type:
        if not resolved:
            resolved.append(getattr(importlib.import_module(module), name))
            if on_resolve is not None:
                on_resolve(resolved[0])
        return resolved[0]

    namespace = {"__module__": module, "__qualname__": name, "resolve": staticmethod(resolve), **known}
    return _LazyClassType(name, (), namespace)


class _CallbackLoader(importlib.abc.Loader):
    """Wraps a module's own loader: executes the module, then the callback."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[], None]):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name: str) -> object:  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """One-shot finder: wraps the loader of `fullname` the first time it is imported, then leaves `sys.meta_path`."""

    def __init__(self, fullname: str, callback: Callable[[], None]):
        self.fullname, self.callback = fullname, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.fullname:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the other finders; the parent package is imported by now
        if spec is not None and spec.loader is not None:
            spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec


def after_import(fullname: str, callback: Callable[[], None]) -> None:
    """Call `callback()` once `fullname` is imported: now if it already is, else right after its import."""
    if fullname in sys.modules:
        callback()
    elif not any(
        isinstance(f, _AfterImportFinder) and (f.fullname, f.callback) == (fullname, callback) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _AfterImportFinder(fullname, callback))
