"""The quickstart's stages: world -> BM25 index -> SFT policy -> RL -> evaluation.

Each stage writes into its own folder under the run folder and records a fingerprint of its
inputs in ``stage.json``; a rerun reuses a stage whose fingerprint matches (``fresh`` starts over).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from tspo.data.qa import QAExample
from tspo.errors import TSPOError
from tspo.quickstart.settings import (
    RL_STAGE_OWN_FIELDS,
    PolicyStage,
    QuickstartSettings,
    RLStage,
    fingerprint,
)
from tspo.retrieval.base import Retriever
from tspo.utils import write_json

if TYPE_CHECKING:
    from tspo.rollout.config import RolloutConfig
    from tspo.train.config import TrainConfig

STAGE_FILE = "stage.json"
PRACTICE_SEED_BASE = 1_000_000  # practice worlds' seeds start here, far from user seeds


@dataclass(frozen=True)
class RunPaths:
    """The folders and files of one quickstart run."""

    root: Path

    @property
    def world(self) -> Path:
        return self.root / "world"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def rl(self) -> Path:
        return self.root / "rl"

    @property
    def evals(self) -> Path:
        return self.root / "eval"

    @property
    def transfer(self) -> Path:
        """Another world (seed + 1) and its index, for the generalisation check."""
        return self.root / "transfer"

    @property
    def img(self) -> Path:
        return self.root / "img"

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def stage_record(folder: Path) -> dict[str, Any] | None:
    """What a finished stage recorded about itself, or None if it never finished."""
    path = folder / STAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def is_done(folder: Path, stage_fingerprint: str) -> bool:
    record = stage_record(folder)
    return record is not None and record.get("fingerprint") == stage_fingerprint


def mark_done(folder: Path, stage_fingerprint: str, **info: Any) -> None:
    write_json(folder / STAGE_FILE, {"fingerprint": stage_fingerprint, **info})


def reset(folder: Path) -> None:
    """Remove a stage folder so it is rebuilt from scratch."""
    if folder.exists():
        shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------------
# Stages


def ensure_world(paths: RunPaths, settings: QuickstartSettings, console: Console) -> Any:
    """Generate and write the world unless an identical one is already there."""
    from tspo.data.world import generate_world, load_world, write_world

    stage_fp = fingerprint(settings.world)
    if is_done(paths.world, stage_fp):
        console.print(f"  reusing the world in {paths.world}")
        return load_world(paths.world)
    reset(paths.world)
    world = generate_world(settings.world.seed, settings.world.size)
    write_world(world, paths.world)
    counts = {split: len(qs) for split, qs in world.questions.items()}
    mark_done(paths.world, stage_fp, documents=len(world.documents), questions=counts)
    console.print(f"  {len(world.documents)} documents, questions {counts} -> {paths.world}")
    return world


def ensure_index(paths: RunPaths, settings: QuickstartSettings, console: Console) -> Retriever:
    """Build the BM25 index of the world's corpus (reused when the world is unchanged)."""
    from tspo.data.world import CORPUS_FILE
    from tspo.retrieval.index import build_index, load_retriever

    stage_fp = fingerprint(settings.world, "bm25")
    if is_done(paths.index, stage_fp):
        console.print(f"  reusing the index in {paths.index}")
    else:
        reset(paths.index)
        build_index(paths.world / CORPUS_FILE, "bm25", paths.index, show_progress=False)
        mark_done(paths.index, stage_fp)
        console.print(f"  BM25 index -> {paths.index}")
    return load_retriever(paths.index)


def practice_worlds(world: Any, count: int) -> list[Any]:
    """``count`` extra worlds (same size, other seeds) whose questions only feed SFT."""
    from tspo.data.world import generate_world

    return [
        generate_world(PRACTICE_SEED_BASE + world.seed * 1000 + i, world.size) for i in range(count)
    ]


def expert_episodes(
    world: Any, retriever: Retriever, policy: PolicyStage, rollout_topk: int, max_turns: int
) -> tuple[list[Any], list[Any], list[Any]]:
    """Noisy expert episodes: (the real world's, the practice worlds', all worlds).

    Every training question of ``world`` is played ``policy.expert_passes`` times, and every
    question of ``policy.practice_worlds`` extra worlds once. Practice worlds share no names with
    ``world``, so the policy must learn to copy names from the question and the documents instead
    of memorising the training entities. Test entities of ``world`` stay unseen.
    """
    from tspo.data.corpus import CorpusDoc
    from tspo.data.expert import ExpertNoise, run_expert
    from tspo.data.world import SPLITS, qa_examples
    from tspo.retrieval.bm25 import BM25Retriever

    noise = ExpertNoise(
        early_answer=policy.early_answer, wrong_query=policy.wrong_query, recover=policy.recover
    )
    options: dict[str, Any] = {
        "noise": noise,
        "topk": rollout_topk,
        "max_turns": max_turns,
        "notes": policy.expert_notes,
    }
    train = qa_examples(world, "train")
    own = []
    for run in range(policy.expert_passes):
        own += run_expert(world, train, retriever, seed=policy.seed * 1000 + run, **options)
    practice_episodes = []
    extra = practice_worlds(world, policy.practice_worlds)
    names = {entity.name for entity in world.entities.values()}
    for index, practice in enumerate(extra):
        docs = [CorpusDoc(eid, title, text) for eid, (title, text) in practice.documents.items()]
        questions = [
            q
            for split in SPLITS
            for q in qa_examples(practice, split)
            if not names.intersection(q.metadata["chain"])  # a name clash with the real world
        ]
        practice_episodes += run_expert(
            practice,
            questions,
            BM25Retriever.from_docs(docs),
            seed=policy.seed * 1000 + 500 + index,
            **options,
        )
    return own, practice_episodes, [world, *extra]


def train_policy(
    world: Any,
    retriever: Retriever,
    policy: PolicyStage,
    out_dir: Path,
    *,
    topk: int = 3,
    max_turns: int = 4,
    max_obs_tokens: int = 200,
    show_progress: bool = True,
) -> dict[str, Any]:
    """SFT of the base model on noisy expert episodes; saves an HF folder.

    The base (``policy.base``, the shipped ``tspo-tiny-base`` by default) already reads and copies;
    SFT teaches it the search protocol, with the loss on the model's own tokens only. Episodes
    come from the world's training questions and from practice worlds, whose names differ, so the
    policy learns to copy names from the question and the documents instead of memorising the
    world. Observations are cut to ``max_obs_tokens``, the rollout's budget (not
    ``policy.sft.max_obs_tokens``): a policy fine-tuned on whole observations but rolled out on cut
    ones learned to emit a broken turn first (``<think> Name </answer>``) on most questions.
    Returns facts for the report.
    """
    from dataclasses import replace

    from tspo.algo import exact_match
    from tspo.train.sft import fine_tune_causal_lm
    from tspo.utils import set_seed

    set_seed(policy.seed)
    own, practice, _ = expert_episodes(world, retriever, policy, topk, max_turns)
    episodes = own + practice
    expert_em = sum(exact_match(e.final_answer or "", e.example.golds) for e in episodes)
    record = fine_tune_causal_lm(
        policy.base,
        episodes,
        replace(policy.sft, max_obs_tokens=max_obs_tokens),
        out_dir,
        device="cpu",
        show_progress=show_progress,
    )
    return {
        "base": policy.base,
        "episodes": len(episodes),
        "own_episodes": len(own),
        "expert_em": expert_em / max(1, len(episodes)),
        "parameters": record["parameters"],
        "vocab_size": record["vocab_size"],
        "sft_steps": record["steps"],
        "sft_loss_first": record["loss_first"],
        "sft_loss_last": record["loss_last"],
    }


def base_fingerprint(base: str) -> str:
    """A short hash of the base model's weights, so a changed base invalidates the SFT stage."""
    from tspo.models.loading import resolve_model_path
    from tspo.utils import file_sha256

    folder = Path(resolve_model_path(base))
    return fingerprint([file_sha256(weights) for weights in sorted(folder.glob("*.safetensors"))])


def ensure_policy(
    paths: RunPaths,
    world: Any,
    retriever: Retriever,
    settings: QuickstartSettings,
    console: Console,
) -> dict[str, Any]:
    """The SFT warm start (reused when world, policy settings and rollout limits are unchanged)."""
    stage_fp = fingerprint(
        settings.world,
        settings.policy,
        settings.rl.topk,
        settings.rl.max_turns,
        settings.rl.max_obs_tokens,
        base_fingerprint(settings.policy.base),
    )
    record = stage_record(paths.sft)
    if is_done(paths.sft, stage_fp) and record is not None:
        console.print(f"  reusing the SFT policy in {paths.sft}")
        return record["info"]
    reset(paths.sft)
    started = time.perf_counter()
    info = train_policy(
        world,
        retriever,
        settings.policy,
        paths.sft,
        topk=settings.rl.topk,
        max_turns=settings.rl.max_turns,
        max_obs_tokens=settings.rl.max_obs_tokens,
    )
    info["seconds"] = time.perf_counter() - started
    mark_done(paths.sft, stage_fp, info=info)
    console.print(
        f"  {info['parameters'] / 1e6:.1f}M-parameter policy, {info['episodes']} expert episodes "
        f"(expert EM {info['expert_em']:.2f}), SFT loss {info['sft_loss_first']:.2f} "
        f"(first step) -> {info['sft_loss_last']:.2f} (mean of the last 10) -> {paths.sft}"
    )
    return info


def rl_trainer_settings(rl: RLStage) -> dict[str, dict[str, object]]:
    """The ``TrainConfig`` sections ``rl`` sets: each field but the quickstart's own, by name."""
    from tspo.train.config import sections_of

    fields = asdict(rl)
    return sections_of({k: v for k, v in fields.items() if k not in RL_STAGE_OWN_FIELDS})


def rl_train_config(
    paths: RunPaths, rl: RLStage, *, output_dir: Path, show_progress: bool = True
) -> TrainConfig:
    """The ``TrainConfig`` of the RL stage: SFT policy, world train split, the BM25 index."""
    from tspo.data.world import split_file
    from tspo.train.config import config_from_dict

    every = rl.checkpoint_every or rl.eval_every or rl.steps
    raw: dict[str, dict[str, object]] = {
        "model": {"name": str(paths.sft), "device": "cpu"},
        "data": {"train_files": [str(paths.world / split_file("train"))]},
        "retriever": {"index": str(paths.index)},
        "optim": {"schedule": "constant"},
        "train": {"output_dir": str(output_dir)},
        "checkpoint": {"every": every, "keep_last": rl.steps // every + 1},
        "logging": {"progress": show_progress, "samples_per_step": 2},
        "eval": {
            "files": [str(paths.world / split_file("dev"))],
            "every": rl.eval_every,
            "max_examples": rl.eval_examples,
        },
    }
    for section, values in rl_trainer_settings(rl).items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw, source="quickstart RL config")


def eval_rollout_config(rl: RLStage) -> RolloutConfig:
    """The rollout of the quickstart's greedy evaluations: the RL stage's turn limits and top-k."""
    from tspo.train.config import EVAL_ROLLOUT_FIELDS, RolloutSection

    section = RolloutSection.model_validate(rl_trainer_settings(rl)["rollout"])
    return section.to_rollout_config(EVAL_ROLLOUT_FIELDS)


def held_out_examples(world_dir: Path, max_examples: int | None) -> list[QAExample]:
    """A world's test questions (the first ``max_examples`` of them, a fixed subset)."""
    from tspo.data.qa import read_qa
    from tspo.data.world import split_file

    examples = read_qa(world_dir / split_file("test"))
    return examples[:max_examples] if max_examples else examples


def ensure_transfer_world(
    paths: RunPaths, settings: QuickstartSettings, console: Console
) -> Retriever:
    """A second world (seed + 1) with its BM25 index: names and facts the policy never saw."""
    from dataclasses import replace

    other = replace(settings, world=replace(settings.world, seed=settings.world.seed + 1))
    transfer = RunPaths(paths.transfer)
    ensure_world(transfer, other, console)
    return ensure_index(transfer, other, console)


def evaluate_folder(
    model_dir: Path,
    retriever: Retriever,
    examples: list[QAExample],
    settings: QuickstartSettings,
    out_dir: Path,
    *,
    show_progress: bool = True,
) -> Any:
    """Greedy evaluation of a saved policy; writes eval.json/eval.md/trajectories.jsonl."""
    import torch

    from tspo.evaluation import evaluate, write_report
    from tspo.models.loading import load_policy

    model, tokenizer = load_policy(str(model_dir), device="cpu")
    with torch.no_grad():
        result = evaluate(
            model,
            tokenizer,
            retriever,
            examples,
            rollout=eval_rollout_config(settings.rl),
            batch_size=settings.eval.batch_size,
            show_progress=show_progress,
        )
    write_report(result, out_dir, meta={"model": str(model_dir)})
    return result


def prepare_process(threads: int | None) -> None:
    """Set torch's CPU threads (``--threads``, else ``$TSPO_THREADS``, else the free cores) and
    silence transformers' per-file progress bars."""
    from transformers.utils import logging as hf_logging

    from tspo.utils import apply_thread_policy, request_threads

    request_threads(threads)  # the trainer applies the policy again when it loads the model
    apply_thread_policy()
    hf_logging.disable_progress_bar()


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise TSPOError(f"--out {out}: exists and is not a folder")


def start_run(out: str | Path, threads: int | None, *, fresh: bool) -> RunPaths:
    """Check and create the run folder (emptied first when ``fresh``); set up the process."""
    paths = RunPaths(Path(out))
    check_out_dir(paths.root)
    prepare_process(threads)
    if fresh and paths.root.exists():
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    return paths


def best_dev_checkpoint(
    validation: Sequence[Mapping[str, Any]], checkpoints: Path
) -> tuple[Path, int] | None:
    """The complete checkpoint under ``checkpoints`` with the best greedy dev EM among the
    ``validation`` rows (the trainer's ``validation.jsonl``), and its step.

    Only steps after the start count (step 0 is the SFT policy); ties go to the later step. None
    when no evaluated step has a complete checkpoint.
    """
    from tspo.train.checkpoint import checkpoint_name, list_checkpoints

    saved = {folder.name: folder for folder in list_checkpoints(checkpoints)}
    candidates = [
        (float(row["em"]), int(row["step"]))
        for row in validation
        if int(row["step"]) > 0 and checkpoint_name(int(row["step"])) in saved
    ]
    if not candidates:
        return None
    _, step = max(candidates)
    return saved[checkpoint_name(step)], step
