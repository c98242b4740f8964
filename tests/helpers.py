"""Helpers shared by several test modules: one home, imported as ``helpers`` (pytest puts
``tests/`` on ``sys.path``, as for any test module). A helper that one module alone uses stays
in that module; helpers that benchmarks use as well live in ``pipeline/`` (a benchmark does
not import from ``tests/``).
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


# --- the `slow` marker's guard -----------------------------------------------------------------


def expensive(fixture_function: F) -> F:
    """Declare a fixture expensive (it builds a cohort and cache, trains, or runs a study or
    subprocesses): every test that uses it, directly or through another fixture, must carry
    the ``slow`` marker, or collection fails (``tests/conftest.py``). Put it under
    ``@pytest.fixture``::

        @pytest.fixture(scope="module")
        @expensive
        def inputs(tmp_path_factory): ...

    The mark travels with the function, so renaming the fixture keeps it.
    """
    fixture_function.expensive_fixture = True
    return fixture_function


def is_expensive(function: Callable) -> bool:
    """Whether :func:`expensive` marked this fixture function."""
    return getattr(function, "expensive_fixture", False) is True
