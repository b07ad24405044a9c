"""The package ships ``py.typed``: apps type-check against its annotations. ``mypy --strict``
passes on the package.

mypy runs in-process (``mypy.api.run``), with no config file and a cache of this session's
own, so the check does not depend on where pytest runs from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import IN_CI

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "src" / "wschat_client"


@pytest.fixture(scope="module")
def mypy(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[str, int]]:
    try:
        import mypy.api as mypy_api
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("mypy is missing (the test extra: pip install -e 'clients/python[test]')")
    cache = tmp_path_factory.mktemp("mypy-cache")

    def run(*files: Path) -> tuple[str, int]:
        # The package by its path: its folder (src) goes first on mypy's search path.
        out, err, status = mypy_api.run(["--strict", "--config-file=", "--cache-dir",
                                         str(cache), "--no-color-output", "--no-pretty",
                                         str(PACKAGE), *map(str, files)])
        return out + err, status
    return run


def test_package_type_checks_strict(mypy: Callable[..., tuple[str, int]]) -> None:
    out, status = mypy()
    assert status == 0, out
