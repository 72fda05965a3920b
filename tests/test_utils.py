"""Shared helpers: atomic folders."""

import pytest

from tspo.utils import atomic_directory


def test_atomic_directory_replaces_the_target_only_on_success(tmp_path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")

    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # staging removed
    assert (target / "old.txt").read_text() == "old"

    with atomic_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_thread_policy_flag_beats_env_beats_model_size(monkeypatch):
    from tspo.errors import TSPOError
    from tspo.utils import SMALL_MODEL_PARAMETERS, THREADS_ENV, choose_threads, free_cores

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert choose_threads(parameters=SMALL_MODEL_PARAMETERS - 1) == 1
    assert choose_threads(parameters=SMALL_MODEL_PARAMETERS) == free_cores() >= 1
    monkeypatch.setenv(THREADS_ENV, "3")
    assert choose_threads(parameters=10) == 3
    assert choose_threads(2, parameters=10) == 2
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(TSPOError, match=THREADS_ENV):
        choose_threads()
    with pytest.raises(TSPOError, match="--threads"):
        choose_threads(0)
