"""The packages' public names resolve, and ``tspo.train``'s stay torch-free until used."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tspo.algo
import tspo.train


@pytest.mark.parametrize("package", [tspo.algo, tspo.train])
def test_every_public_name_resolves(package: object) -> None:
    names = package.__all__  # type: ignore[attr-defined]
    assert names == sorted(names, key=str.casefold) or names == sorted(names)
    for name in names:
        assert getattr(package, name) is not None, f"{package.__name__}.{name}"


def test_train_exports_are_the_lazy_table() -> None:
    assert set(tspo.train.__all__) == set(tspo.train._EXPORTS)
    assert set(dir(tspo.train)) >= set(tspo.train.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tspo.train.nope  # noqa: B018


def test_the_config_api_does_not_load_torch() -> None:
    code = (
        "import sys\n"
        "from tspo.train import TrainConfig, load_config, config_from_dict\n"
        "config_from_dict({'data': {'train_files': []}})\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"
