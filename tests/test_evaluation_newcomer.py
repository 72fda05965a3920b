"""`tspo eval` for a newcomer: progress on stderr only, the chat template on by default when the
tokenizer (or the checkpoint) says so, several files reported apart, bf16 autocast vs fp32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import FACTS, TinyWorld, build_tiny_world, single_thread, write_jsonl
from typer.testing import CliRunner

from tspo.evaluation import OVERALL, group_labels, resolve_chat_template, run_eval
from tspo.rollout import RolloutConfig
from tspo.rollout.batch import Trajectory

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_ROLLOUT = RolloutConfig(max_turns=1, max_turn_tokens=4, max_obs_tokens=8, topk=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    with single_thread():
        return build_tiny_world(tmp_path_factory.mktemp("eval-newcomer"))


@pytest.fixture(scope="module")
def chat_model(world: TinyWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro model with a chat template in its tokenizer (an "instruct" model)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(world.model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def eval_args(world: TinyWorld, model: Path, *extra: str) -> list[str]:
    return [
        "eval", "--model", str(model), "--data", str(world.qa), "--corpus", str(world.corpus),
        "--max-turns", "1", "--max-turn-tokens", "4", "--max-obs-tokens", "8", "--topk", "1",
        "--device", "cpu", "--threads", "1", "--bf16", "off", *extra,
    ]  # fmt: skip


def test_progress_goes_to_stderr_and_never_into_the_json(world: TinyWorld) -> None:
    from tspo.cli import app

    with single_thread():
        result = CliRunner().invoke(app, eval_args(world, world.model_dir, "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout is the JSON and nothing else
    assert report["scores"][OVERALL]["count"] == len(FACTS)
    assert "first_search" in report["scores"][OVERALL]
    assert "evaluating" in result.stderr  # the progress (plain lines when not a terminal)
    assert "evaluating" not in result.stdout


def test_chat_template_is_on_by_default_when_the_tokenizer_has_one(
    world: TinyWorld, chat_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(world.model_dir)
    chat = AutoTokenizer.from_pretrained(chat_model)
    assert resolve_chat_template(world.model_dir, plain, None) is False
    assert resolve_chat_template(chat_model, chat, None) is True
    assert resolve_chat_template(chat_model, chat, False) is False  # --no-chat-template
    # A checkpoint that says how it was trained wins over the tokenizer.
    (tmp_path / "tspo_sft.json").write_text(json.dumps({"use_chat_template": False}))
    assert resolve_chat_template(tmp_path, chat, None) is False

    with open_corpus(world) as retriever, single_thread():
        result = run_eval(
            str(chat_model), [world.qa], retriever=retriever, rollout=TINY_ROLLOUT, device="cpu",
            show_progress=False, bf16=False,
        )  # fmt: skip
    assert result.settings["use_chat_template"] is True
    assert result.trajectories[0].question == FACTS[0][2]


def test_files_sharing_a_data_source_are_reported_apart(world: TinyWorld, tmp_path: Path) -> None:
    rows = [{"id": f"q{i}", "question": q, "golden_answers": g, "data_source": "wiki"}
            for i, (_, _, q, g) in enumerate(FACTS)]  # fmt: skip
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[:2])
    test = write_jsonl(tmp_path / "test.jsonl", rows[2:5])
    with open_corpus(world) as retriever, single_thread():
        result = run_eval(
            str(world.model_dir), [dev, test], retriever=retriever, rollout=TINY_ROLLOUT,
            device="cpu", show_progress=False, bf16=False,
        )  # fmt: skip
    assert list(result.scores) == ["dev/wiki", "test/wiki", OVERALL]
    assert [result.scores[k]["count"] for k in result.scores] == [2, 3, 5]


def test_group_labels_keep_data_sources_when_files_do_not_share_one() -> None:
    from tspo.data.qa import QAExample

    def ex(source: str) -> QAExample:
        return QAExample("i", "q?", ["a"], source, {})

    assert group_labels([("nq", [ex("nq")]), ("hotpotqa", [ex("hotpotqa")])]) is None
    assert group_labels([("a", [ex("s"), ex("t")]), ("b", [ex("s")])]) == ["a/s", "a/t", "b/s"]


def test_first_search_counts_a_well_formed_first_search() -> None:
    from tspo.evaluation import summarize

    searched = Trajectory("a", "q", ["g"], "s", 0, queries=["x", None])
    answered = Trajectory("b", "q", ["g"], "s", 0, queries=[None])
    assert summarize([searched, answered])["first_search"] == 0.5


def test_bf16_autocast_stays_within_tolerance_of_fp32(world: TinyWorld) -> None:
    """Losses and log-probs of a micro Llama under bf16 autocast (fp32 weights) against fp32.

    Tolerance: mean token log-prob within 0.02 nats, every token within 0.15 nats, and the
    masked SFT loss within 1% (bf16 keeps 8 bits of mantissa: ~0.4% relative error per op).
    """
    from transformers import AutoModelForCausalLM

    from tspo.train.forward import autocast_context
    from tspo.train.sft import SFTExample, collate, model_loss

    model = AutoModelForCausalLM.from_pretrained(world.model_dir)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (24, 40, 33)]
    examples = [SFTExample(ids, [0] * 8 + [1] * (len(ids) - 8)) for ids in rows]
    batch = collate(examples, pad_id=0)
    cpu = torch.device("cpu")
    with single_thread(), torch.no_grad():
        fp32_loss = model_loss(model, batch)
        fp32_logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        with autocast_context(cpu, True):
            bf16_loss = model_loss(model, batch)
            bf16_logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits

    def token_logprobs(logits: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(logits.float()[:, :-1], dim=-1)
        picked = logprobs.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        return picked[batch["attention_mask"][:, 1:].bool()]

    assert bf16_logits.dtype == torch.bfloat16  # autocast really ran in bf16
    fp32_lp, bf16_lp = token_logprobs(fp32_logits), token_logprobs(bf16_logits)
    assert (fp32_lp - bf16_lp).abs().max() < 0.15
    assert (fp32_lp.mean() - bf16_lp.mean()).abs() < 0.02
    assert abs(float(bf16_loss) - float(fp32_loss)) < 0.01 * float(fp32_loss)


def open_corpus(world: TinyWorld):
    from tspo.retrieval.index import open_retriever

    return open_retriever(corpus=str(world.corpus))
