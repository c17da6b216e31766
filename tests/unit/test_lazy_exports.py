"""Lazy package exports: a public name must never share its name with a submodule of the same package.

Python's import system sets ``package.<submodule>`` to the module object once that submodule is imported, so an
export sharing the name (``ffnkit.steer`` the function vs a module ``ffnkit/steer.py``) silently turns into the
module depending on which test or user code imported first. This broke ``from ffnkit import steer`` in CI.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import ffnkit

PACKAGES = ["ffnkit", "ffnkit.inspect", "ffnkit.compress", "ffnkit.train", "ffnkit.modules", "ffnkit.kernels"]


@pytest.mark.parametrize("name", PACKAGES)
def test_no_export_shadows_a_submodule(name):
    package = importlib.import_module(name)
    exports = set(getattr(package, "__all__", ()))
    submodules = {info.name for info in pkgutil.iter_modules(package.__path__)}
    assert not exports & submodules, f"{name}: exports named like submodules: {sorted(exports & submodules)}"


def test_public_functions_stay_callable_after_their_modules_are_imported():
    # A fresh interpreter, so the import order is the one a user would have.
    code = (
        "import ffnkit.steering, ffnkit.inspect.tracing\n"
        "from ffnkit import steer, trace\n"
        "from ffnkit.inspect import trace as trace2\n"
        "assert callable(steer) and callable(trace) and callable(trace2), (steer, trace, trace2)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_export_resolves():
    missing = [name for name in ffnkit.__all__ if getattr(ffnkit, name, None) is None]
    assert not missing
