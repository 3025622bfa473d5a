"""function_app.app: every folder under functions/ is registered, names are unique, one trigger each,
and the devhost can host every binding it declares with the sample local settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devhost.config import load_local_settings
from devhost.index import index_app

ROOT = Path(__file__).resolve().parent.parent


def function_folders() -> set[str]:
    return {p.name for p in (ROOT / "functions").iterdir()
            if p.is_dir() and not p.name.startswith(("_", ".")) and (p / "__init__.py").exists()}


@pytest.fixture(scope="module")
def functions():  # type: ignore[no-untyped-def]
    # A fresh import: get_functions() may be called only once per app object.
    import importlib

    import function_app

    module = importlib.reload(function_app)
    return module, module.app.get_functions()


def test_every_folder_is_registered(functions) -> None:  # type: ignore[no-untyped-def]
    _, funcs = functions
    registered = {f.get_user_function().__module__.split(".")[1] for f in funcs
                  if f.get_user_function().__module__.startswith("functions.")}
    assert function_folders() - registered == set(), "folders whose blueprint registers no function"


def test_names_are_unique_and_each_has_exactly_one_trigger(functions) -> None:  # type: ignore[no-untyped-def]
    _, funcs = functions
    names = [f.get_function_name() for f in funcs]
    assert len(names) == len(set(names))
    for function in funcs:
        bindings = [json.loads(raw) for raw in function.get_raw_bindings()]
        triggers = [b for b in bindings if b["type"].endswith("Trigger")]
        assert len(triggers) == 1, function.get_function_name()


def test_devhost_can_host_the_app_with_the_sample_settings() -> None:
    import importlib

    import function_app

    module = importlib.reload(function_app)
    settings = load_local_settings(ROOT / "local.settings.sample.json")
    specs = index_app(module.app, settings)  # raises on a missing %SETTING% or an unsupported binding
    assert {s.name for s in specs}
