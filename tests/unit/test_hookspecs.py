"""Every hook is documented and follows the naming rules (as datasette's test_docs does)."""

from __future__ import annotations

import inspect

from phi4_engine import hookspecs
from phi4_engine.manager import REGISTRATION_HOOKS


def _specs():
    return {n: f for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "phi4_engine_spec")}


def test_every_hook_is_prefixed_and_documented():
    specs = _specs()
    assert len(specs) == 15
    for name, func in specs.items():
        assert name.startswith("phi4_"), name
        assert func.__doc__ and len(func.__doc__.strip()) > 20, f"{name} needs a docstring"


def test_registration_hooks_take_only_register():
    specs = _specs()
    assert set(REGISTRATION_HOOKS) <= set(specs)
    for name in REGISTRATION_HOOKS:
        assert list(inspect.signature(specs[name]).parameters) == ["register"], name


def test_readme_names_the_hook_module():
    from tests.conftest import REPO

    assert "phi4_engine/hookspecs.py" in (REPO / "README.md").read_text()
