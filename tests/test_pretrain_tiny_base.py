"""The shipped base `tspo-tiny-base`: it loads, matches its card, and still reads and copies."""

from __future__ import annotations

import json
import time

import pytest

from tspo.errors import TSPOError
from tspo.models.loading import TINY_BASE_ALIAS, load_policy, resolve_model_path, tiny_base_path
from tspo.protocol import PROTOCOL_TAGS
from tspo.utils import file_sha256

# Lower than the card's gates (measured on 300 items each): a small sample must still clear them,
# so a broken, truncated or swapped asset fails.
SAMPLE_FLOORS = {"copy": 0.8, "rc_one_doc": 0.6, "rc_twin": 0.3}


@pytest.fixture(scope="module")
def base():
    return load_policy(TINY_BASE_ALIAS, device="cpu")


def test_alias_resolves_to_the_packaged_folder():
    folder = tiny_base_path()
    assert resolve_model_path(TINY_BASE_ALIAS) == str(folder)
    assert (folder / "model.safetensors").stat().st_size <= 20 * 2**20


def test_weights_match_the_model_card():
    folder = tiny_base_path()
    digest = file_sha256(folder / "model.safetensors")
    assert digest in (folder / "README.md").read_text()
    facts = json.loads((folder / "pretrain.json").read_text())
    assert facts["sha256"] == digest
    for gate, floor in SAMPLE_FLOORS.items():
        assert facts["gates"][gate] >= floor


def test_auto_classes_load_it_and_the_tags_are_single_tokens(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tiny_base_path())
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_path())
    for tag in PROTOCOL_TAGS:
        assert len(tokenizer.encode(tag, add_special_tokens=False)) == 1


def test_shipped_base_still_passes_its_gates_on_a_small_sample(base):
    from tspo.pretrain.gates import measure_gates

    model, tokenizer = base
    results = measure_gates(model, tokenizer, 40, seed=1)
    for gate, floor in SAMPLE_FLOORS.items():
        assert results[gate] >= floor, results


def test_unknown_model_name_fails_at_once_offline_with_the_aliases():
    started = time.perf_counter()
    with pytest.raises(TSPOError, match="tspo-tiny-base") as caught:
        resolve_model_path("smollm2")
    assert time.perf_counter() - started < 2
    assert "\n" not in str(caught.value)


def test_a_folder_without_config_is_named_as_such(tmp_path):
    with pytest.raises(TSPOError, match="not a model folder"):
        resolve_model_path(str(tmp_path))


def test_a_lora_adapter_folder_counts_as_a_model_folder(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
