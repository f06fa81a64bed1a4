"""Package-wide contracts: complete ``__all__`` lists and one base exception."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import thunderline_lab
from thunderline_lab.errors import ThunderlineLabError

MODULES = sorted(
    m.name
    for m in pkgutil.iter_modules(thunderline_lab.__path__, "thunderline_lab.")
    if m.name != "thunderline_lab.cli"
)


@pytest.mark.parametrize("name", MODULES)
def test_all_is_complete(name: str) -> None:
    module = importlib.import_module(name)
    declared = getattr(module, "__all__", None)
    assert declared is not None, f"{name} has no __all__"
    assert len(declared) == len(set(declared)), f"{name}.__all__ has duplicates"
    for item in declared:
        assert hasattr(module, item), f"{name}.__all__ names missing {item}"
    defined_here = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == name
    }
    missing = defined_here - set(declared)
    assert not missing, f"{name}: public names not in __all__: {sorted(missing)}"


@pytest.mark.parametrize("name", MODULES)
def test_errors_derive_from_one_base(name: str) -> None:
    module = importlib.import_module(name)
    for attr, obj in vars(module).items():
        if attr.startswith("_"):  # internal control-flow signals that never leave the module
            continue
        if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == name:
            assert issubclass(obj, ThunderlineLabError), f"{obj} does not derive from the base"
