"""Plant a bug in this process's copy of a `fast` module, written as a source diff.

    plant(monkeypatch, "fast.worker.sampler", "kth_index = ... - 1", "kth_index = ...")

The module's source is edited (the old text must occur exactly once), compiled into a scratch
namespace, and every function or method whose code changed replaces the original — on its
class, on the module, and wherever another `fast` module imported it by name. A Triton kernel
whose code changed replaces the module's kernel (the launchers look it up at each launch; the
interpreter re-reads a kernel's source, so the edited source is registered with `linecache`
under its own file name). Everything else (classes, enums, unchanged functions) stays the
original object, so identity checks and isinstance keep working. `monkeypatch` undoes it all
after the test. Every `fast` and `ref` module is imported first: one imported only after the
plant would bind a planted function by name for good (nothing would switch it back).
"""

from __future__ import annotations

import importlib
import inspect
import linecache
import os
import pkgutil
import sys
import types
from typing import Any


def _same_code(a: types.CodeType, b: types.CodeType) -> bool:
    """Equal bytecode, names and constants (nested code compared recursively; lines ignored)."""
    if (a.co_code, a.co_names, a.co_varnames, a.co_freevars) != (b.co_code, b.co_names, b.co_varnames, b.co_freevars):
        return False
    if len(a.co_consts) != len(b.co_consts):
        return False
    for x, y in zip(a.co_consts, b.co_consts):
        if isinstance(x, types.CodeType) and isinstance(y, types.CodeType):
            if not _same_code(x, y):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def _function(obj: Any) -> types.FunctionType | None:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        obj = obj.fget
    return obj if isinstance(obj, types.FunctionType) else None


def _kernel(obj: Any) -> types.FunctionType | None:
    """The Python function of a Triton kernel (`@triton.jit`, compiled or interpreted), else None."""
    fn = getattr(obj, "fn", None)
    return fn if isinstance(fn, types.FunctionType) and not isinstance(obj, (type, types.FunctionType)) else None


def _changed(new: Any, old: Any) -> bool:
    """The code differs (of the wrapped functions, for a decorated one such as
    `@torch.inference_mode()`, whose wrapper's own code never changes)."""
    f, g = _function(new), _function(old)
    if f is None or g is None:
        return f is not None
    return not _same_code(inspect.unwrap(f).__code__, inspect.unwrap(g).__code__)


def _import_engine_modules() -> None:
    """Import every module of `fast` and `ref` (those that fail to import are skipped). Not the
    Triton backend where it cannot run: its kernels' mode (compiled or interpreted) is fixed at
    import, so importing it before TRITON_INTERPRET is set would break a later CPU test."""
    import torch

    triton_usable = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    for package in ("fast", "ref"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            if info.name in sys.modules or (info.name == "fast.attention.triton_backend" and not triton_usable):
                continue
            try:
                importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 - an optional dependency missing: nothing there to plant
                pass


def plant(monkeypatch, module_name: str, old: str, new: str) -> list[str]:
    """Apply the diff; returns the qualified names that were replaced (at least one)."""
    _import_engine_modules()
    module = sys.modules.get(module_name) or __import__(module_name, fromlist=["_"])
    source = inspect.getsource(module)
    count = source.count(old)
    assert count == 1, f"{module_name}: the text to replace occurs {count} times: {old!r}"
    scratch: dict[str, Any] = {"__name__": module_name, "__file__": module.__file__}
    edited, filename = source.replace(old, new), f"{module.__file__} (planted)"
    monkeypatch.setitem(linecache.cache, filename, (len(edited), None, edited.splitlines(True), filename))
    exec(compile(edited, filename, "exec"), scratch)
    replaced: list[str] = []
    for name, value in list(scratch.items()):
        original = getattr(module, name, None)
        if isinstance(value, type) and isinstance(original, type) and value.__module__ == module_name:
            for attr, member in vars(value).items():
                if _changed(member, vars(original).get(attr)):
                    monkeypatch.setattr(original, attr, _rebind_class_cell(member, original))
                    replaced.append(f"{name}.{attr}")
            scratch[name] = original  # the changed methods see the original classes
        elif isinstance(value, types.FunctionType) and value.__module__ == module_name:
            if original is not None and _changed(value, original):
                _replace_everywhere(monkeypatch, original, value)
                replaced.append(name)
            elif original is not None:
                scratch[name] = original
        elif _kernel(value) is not None and _kernel(value).__module__ == module_name:
            if _kernel(original) is not None and _changed(_kernel(value), _kernel(original)):
                monkeypatch.setattr(module, name, value)
                replaced.append(name)
            elif original is not None:
                scratch[name] = original
    assert replaced, f"{module_name}: the diff changed no function"
    return replaced


def _rebind_class_cell(member: Any, cls: type) -> Any:
    """A method using zero-argument `super()` closes over its class: point it at the original."""
    f = _function(member)
    if f is None or "__class__" not in f.__code__.co_freevars:
        return member
    cells = tuple(types.CellType(cls) if name == "__class__" else cell
                  for name, cell in zip(f.__code__.co_freevars, f.__closure__))
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, cells)
    g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
    return g if member is f else type(member)(g)


def _replace_everywhere(monkeypatch, original: types.FunctionType, value: types.FunctionType) -> None:
    for mod in list(sys.modules.values()):
        if mod is None or not getattr(mod, "__name__", "").startswith(("fast", "ref")):
            continue
        for name, obj in list(vars(mod).items()):
            if obj is original:
                monkeypatch.setattr(mod, name, value)
