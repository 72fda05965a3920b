"""`tspo pretrain`: practice items, the packed stream, a miniature run, resume, the model card."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from tspo.data.world import generate_world
from tspo.pretrain.items import (
    GATE_WORLD_SEED,
    PRACTICE_SEED_BASE,
    PretrainMix,
    items_for_world,
    one_hop_items,
    practice_seed,
)
from tspo.pretrain.loop import (
    MODEL_DIR,
    STATE_DIR,
    PretrainConfig,
    lr_factor,
    parse_shape,
    pretrain,
)
from tspo.pretrain.packing import PackedStream, StreamPosition
from tspo.protocol import PROTOCOL_TAGS
from tspo.train.sft import masked_lm_loss
from tspo.utils import file_sha256

TINY_MIX = PretrainMix(world_size="tiny")


def test_items_never_contain_protocol_tags_and_weight_only_answers():
    world = generate_world(practice_seed(0), "tiny")
    items = items_for_world(world, TINY_MIX, random.Random(0))
    texts = ["".join(text for text, _ in item) for item in items]
    assert not any(tag in text for text in texts for tag in PROTOCOL_TAGS)
    reading = [item for item in items if len(item) == 2 and item[1][1] == TINY_MIX.answer_weight]
    assert len(reading) == len(one_hop_items(world))
    for prompt, answer in reading:
        assert prompt[0].endswith("\nAnswer:") and answer[0].startswith(" ")
        assert answer[0].strip() in prompt[0]  # the answer is in a shown document


def test_item_mix_follows_the_shares():
    world = generate_world(practice_seed(1), "small")
    items = items_for_world(world, PretrainMix(), random.Random(1))
    reading = sum(1 for item in items if item[-1][1] == PretrainMix().answer_weight)
    assert reading / len(items) == pytest.approx(0.6, abs=0.01)


def test_practice_seeds_are_disjoint_from_user_quickstart_and_gate_worlds():
    from tspo.quickstart.pipeline import PRACTICE_SEED_BASE as SFT_PRACTICE_BASE

    # SFT practice worlds use 1_000_000 + world_seed * 1000 + i: below 2_000_000 for seeds < 1000.
    assert PRACTICE_SEED_BASE >= SFT_PRACTICE_BASE + 1000 * 1000
    assert GATE_WORLD_SEED > practice_seed(900_000)


def test_packed_stream_fills_rows_and_resumes_at_the_same_row(tiny_tokenizer):
    stream = PackedStream(tiny_tokenizer, TINY_MIX, seq_len=128, batch_size=4)
    first_ids, first_weights = stream.next_batch()
    assert first_ids.shape == first_weights.shape == (4, 128)
    padding = first_ids == tiny_tokenizer.pad_token_id
    assert torch.all(first_weights[padding] == 0)
    saved = StreamPosition(**vars(stream.position))
    expected, _ = stream.next_batch()
    resumed = PackedStream(tiny_tokenizer, TINY_MIX, seq_len=128, batch_size=4, position=saved)
    assert torch.equal(resumed.next_batch()[0], expected)


def test_weighted_loss_ignores_zero_weights_and_scales_answers():
    logits = torch.randn(1, 4, 7)
    ids = torch.tensor([[1, 2, 3, 4]])
    base = masked_lm_loss(logits, ids, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    per_token = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    assert base.item() == pytest.approx(per_token[:2].mean().item(), rel=1e-5)


def test_shape_and_schedule():
    assert parse_shape("128x4")["num_attention_heads"] == 4
    config = PretrainConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(100, config) == pytest.approx(config.min_lr_ratio)


def test_bad_shape_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tspo.cli",
            "pretrain",
            "--out",
            str(tmp_path / "r"),
            "--shape",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: --shape") and "Traceback" not in done.stderr


MINI = PretrainConfig(
    steps=4,
    shape="64x2",
    batch_size=2,
    seq_len=256,
    warmup_steps=2,
    eval_every=2,
    eval_items=3,
    final_eval_items=3,
    checkpoint_every=2,
    log_every=1,
    tokenizer_worlds=1,
    mix=TINY_MIX,
)


class _Stop(Exception):
    pass


def stop_at_three(step: int, total: int, loss: float) -> None:
    if step == 3:
        raise _Stop


def test_miniature_pretrain_writes_a_loadable_base_with_its_card_and_resumes_exactly(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = tmp_path / "full"
    facts = pretrain(full, MINI, command="tspo pretrain --steps 4", threads=1, say=lambda _: None)
    model_dir = full / MODEL_DIR
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_dir)
    card = (model_dir / "README.md").read_text()
    assert (
        facts["sha256"] == file_sha256(model_dir / "model.safetensors") and facts["sha256"] in card
    )
    assert "tspo pretrain --steps 4" in card and "| steps | 4 " in card
    assert set(json.loads((model_dir / "pretrain.json").read_text())["gates"]) >= {"copy"}
    log = [json.loads(line) for line in (full / "log.jsonl").open()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]

    # Killed after step 3 (state saved at step 2), then run again: same final weights.
    killed = tmp_path / "killed"
    with pytest.raises(_Stop):
        pretrain(killed, MINI, on_step=stop_at_three, say=lambda _: None)
    assert json.loads((killed / STATE_DIR / "progress.json").read_text())["step"] == 2
    said = []
    pretrain(killed, MINI, say=said.append)
    assert said == [f"resuming from step 2 ({killed / STATE_DIR})"]
    resumed = AutoModelForCausalLM.from_pretrained(killed / MODEL_DIR)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_finished_or_different_runs_are_refused(tmp_path):
    from tspo.errors import TSPOError

    out = tmp_path / "run"
    with pytest.raises(_Stop):
        pretrain(out, MINI, on_step=stop_at_three, say=lambda _: None)
    with pytest.raises(TSPOError, match="other settings"):
        pretrain(out, replace(MINI, lr=5e-4), say=lambda _: None)
    (out / STATE_DIR / "progress.json").write_text("{not json")
    with pytest.raises(TSPOError, match="is damaged.*--fresh"):
        pretrain(out, MINI, say=lambda _: None)
    shutil.rmtree(out)
    pretrain(out, MINI, say=lambda _: None)
    with pytest.raises(TSPOError, match="finished base"):
        pretrain(out, MINI, say=lambda _: None)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tspo.models.tiny import train_tokenizer
    from tspo.pretrain.items import tokenizer_corpus

    return train_tokenizer(tokenizer_corpus(1, TINY_MIX), vocab_size=400)


def test_question_first_items_put_the_question_before_the_documents_at_the_given_share():
    world = generate_world(practice_seed(1), "small")
    mix = PretrainMix(question_first=0.5)
    items = items_for_world(world, mix, random.Random(1))
    reading = [i for i in items if i[-1][1] == mix.answer_weight]
    first = [p for (p, _), _ in reading if p.startswith("Question: ")]
    assert len(first) / len(reading) == pytest.approx(0.5, abs=0.05)
    for prompt in first:
        assert prompt.index("Question: ") < prompt.index("Doc 1(Title:") and "\nAnswer:" in prompt
    # A share of 0 draws nothing extra: the shipped base's item stream is unchanged.
    plain = items_for_world(world, PretrainMix(), random.Random(1))
    explicit = items_for_world(world, PretrainMix(question_first=0.0), random.Random(1))
    assert plain == explicit and not any(i[0][0].startswith("Question: ") for i in plain)


def test_continued_pretraining_starts_from_the_init_weights_and_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    parent = tmp_path / "parent"
    pretrain(parent, MINI, command="tspo pretrain (parent)", say=lambda _: None)
    config = replace(
        MINI, steps=2, init=str(parent / MODEL_DIR), first_world=5, lr=0.0, warmup_steps=1
    )
    child = tmp_path / "child"
    facts = pretrain(child, replace(config, mix=replace(TINY_MIX, question_first=0.5)))
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(parent / MODEL_DIR).state_dict()
    after = AutoModelForCausalLM.from_pretrained(child / MODEL_DIR).state_dict()
    # lr 0 leaves AdamW's weight decay at 0 too: the weights are exactly the parent's.
    assert all(torch.equal(before[k], after[k]) for k in before)
    parent_vocab = AutoTokenizer.from_pretrained(parent / MODEL_DIR).get_vocab()
    assert AutoTokenizer.from_pretrained(child / MODEL_DIR).get_vocab() == parent_vocab
    card = (child / MODEL_DIR / "README.md").read_text()
    assert "from `" in card and facts["parent"]["sha256"] in card
    assert "tspo pretrain (parent)" in card and "rc_question_first" in facts["gates"]
    assert facts["practice_worlds"] - 5 >= 1  # read from world 5 on


def test_unknown_init_is_one_line_and_exit_2_before_any_work(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tspo.cli", "pretrain", "--out", str(tmp_path / "r")]
        + ["--init", "no-such-base"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error:") and "no-such-base" in done.stderr
    assert not (tmp_path / "r").exists()
