"""
Lazy imports, so that `import hf_fss` costs what its caller uses (docs/development.md, "Import time").

`import torch` costs about 1 s of CPU, transformers' configuration classes 0.5 s more and its `modeling_utils` about
3.5 s (it pulls in `torch._dynamo` and `torch.distributed.tensor`). `import hf_fss` imports none of them, and every
public name still works, through three tools:

- `lazy_exports`: a module `__getattr__` (PEP 562) that imports a name's submodule on first access;
- `lazy_class`: a stand-in class for transformers' Auto mappings that imports the real class on first use;
- `after_import`: run a callback once a module has been imported (or now, if it already has been), e.g. register the
  configurations with `AutoConfig` when `transformers.models.auto.configuration_auto` is imported, since `AutoConfig`
  cannot be used before that.
"""

from __future__ import annotations

import copyreg
import importlib
import importlib.abc
import importlib.util
import sys
import warnings
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

    def __instancecheck__(cls, instance) -> bool:  # a model of the real class is an instance of its stand-in
        return isinstance(instance, cls.resolve())

    def __subclasscheck__(cls, subclass) -> bool:
        return issubclass(subclass, cls.resolve())


def _real_class(module: str, name: str) -> type:
    return getattr(importlib.import_module(module), name)


# A stand-in pickles as the real class (pickle looks a class up by its name, which the stand-in shares).
copyreg.pickle(_LazyClassType, lambda cls: (_real_class, (cls.__module__, cls.__qualname__)))


def lazy_class(module: str, name: str, on_resolve: Callable[[type], None] | None = None, **known) -> type:
    """
    A class standing in for `module.name` until it is used: reading an attribute it does not hold (`from_pretrained`,
    `_from_config`, ...) or calling it imports `module` and forwards to the real class; `on_resolve(real)` is called
    once then (e.g. to register the real class in place of the stand-in). `known` are attributes answered without the
    import (e.g. `config_class`, which `AutoModel.register` reads). `isinstance` / `issubclass` against the stand-in
    answer for the real class, and the stand-in pickles as the real class; it is not the real class itself (`is`).
    """
    resolved: list[type] = []

    def resolve() -> type:
        if not resolved:
            resolved.append(_real_class(module, name))
            if on_resolve is not None:
                on_resolve(resolved[0])
        return resolved[0]

    namespace = {"__module__": module, "__qualname__": name, "resolve": staticmethod(resolve), **known}
    return _LazyClassType(name, (), namespace)


class _Callbacks:
    """Runs the callbacks of watched imports, inside the import (other threads wait for it). A callback that fails
    (e.g. a module it needs is half-initialised by another thread) is reported as a warning, never as a failure of the
    import that triggered it, and is tried again after the next watched import or `after_import` call."""

    failed: list = []

    @classmethod
    def run(cls, callback: Callable[[], None] | None = None) -> None:
        pending, cls.failed = [*cls.failed, *([callback] if callback is not None else [])], []
        for each in pending:
            try:
                each()
            except Exception as err:  # noqa: BLE001 - any failure: the user's import must still succeed
                cls.failed.append(each)
                warnings.warn(
                    f"{each.__module__}.{each.__qualname__} could not run yet ({type(err).__name__}: {err}); it is "
                    "tried again after the next import it watches. Import hf_fss and transformers' Auto classes "
                    "from one thread.",
                    RuntimeWarning,
                    stacklevel=2,
                )


class _CallbackLoader(importlib.abc.Loader):
    """Wraps a module's own loader: executes the module, then hands the finder's callback on."""

    def __init__(self, loader: importlib.abc.Loader, finder: _AfterImportFinder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._finder.fire()

    def __getattr__(self, name: str) -> object:  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of `fullname` until that module has been executed once, then leaves `sys.meta_path`.

    One finder per module, found by its `hf_fss_after_import` attribute (not its class, so a reload of this file
    finds it too); its callbacks are keyed by their module and name, so a reload of the module that registered one
    replaces it instead of adding a second. It stays through mere look-ups: transformers probes modules with
    `importlib.util.find_spec` without importing them, so a finder that left at the first look-up would miss the
    import."""

    def __init__(self, fullname: str):
        self.hf_fss_after_import = fullname
        self.callbacks: dict[tuple[str, str], Callable[[], None]] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname != self.hf_fss_after_import:
            return None
        for finder in sys.meta_path:  # the spec the other finders give (never ours: they would ask each other)
            if getattr(finder, "hf_fss_after_import", None) is None and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None:
                        spec.loader = _CallbackLoader(spec.loader, self)
                    return spec
        return None

    def fire(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
            for callback in self.callbacks.values():
                _Callbacks.run(callback)


def after_import(fullname: str, callback: Callable[[], None]) -> None:
    """
    Call `callback()` once `fullname` is imported: now if it already is, else right after the module has executed,
    before its import returns (see `_Callbacks` for failures). Registering a callback of the same module and name
    again (a reload) replaces the earlier one.
    """
    module = sys.modules.get(fullname)
    if module is not None:
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            importlib.import_module(fullname)  # another thread is importing it: wait for the import to finish
        _Callbacks.run(callback)
        return
    finder = next((f for f in sys.meta_path if getattr(f, "hf_fss_after_import", None) == fullname), None)
    if finder is None:
        finder = _AfterImportFinder(fullname)
        sys.meta_path.insert(0, finder)
    finder.callbacks[(callback.__module__, callback.__qualname__)] = callback
