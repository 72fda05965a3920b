"""`RolloutEngine`: batched multi-turn search-agent rollouts with a hand-written decoding loop.

Each turn decodes all unfinished rollouts together until every one of them has hit a stop string,
an end-of-sequence token or ``max_turn_tokens``. The environment then answers every rollout of the
batch at once (one retriever call for all searches), and its replies are appended to the same KV
cache (``kv_cache=True``) or the whole context is re-encoded (``kv_cache=False``, the reference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tspo.data.qa import QAExample
from tspo.errors import TSPOError
from tspo.protocol import STOP_STRINGS, build_prompt, parse_action
from tspo.retrieval.base import Retriever
from tspo.rollout.assemble import Segment, assemble_batch
from tspo.rollout.batch import RolloutBatch, Trajectory
from tspo.rollout.config import RolloutConfig
from tspo.rollout.context import CachedContext
from tspo.rollout.environment import reply_to_actions
from tspo.rollout.sampling import next_tokens
from tspo.rollout.scoring import score_trajectory
from tspo.rollout.stopping import StopChecker

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class RolloutEngine:
    """Generates scored `RolloutBatch`es from a causal LM, its tokenizer and a retriever.

    ``old_logprobs`` records ``log_softmax(logits)`` of each generated token: the policy's
    log-probability at temperature 1 without top-p, whatever the sampling settings.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        retriever: Retriever,
        config: RolloutConfig | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.config = config or RolloutConfig()
        self.eos_ids = _eos_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            if not self.eos_ids:
                raise TSPOError("the tokenizer has neither a pad token nor an eos token")
            pad_id = min(self.eos_ids)
        self.pad_id = pad_id
        self._stops: StopChecker | None = None

    def generate(
        self,
        examples: list[QAExample],
        group_size: int,
        *,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> RolloutBatch:
        """Roll out ``group_size`` trajectories per example and score them.

        Rows of one example are consecutive and share its index as group id. ``greedy`` decodes
        by argmax (evaluation); otherwise tokens are sampled with the config's temperature and
        top-p from uniforms drawn by ``generator`` (any device). The model runs in eval mode
        under ``no_grad``, and its previous mode is restored.
        """
        if group_size < 1:
            raise TSPOError(f"group_size must be >= 1, got {group_size}")
        if not examples:
            raise TSPOError("no examples to roll out")
        trajectories = [
            Trajectory(
                example_id=ex.id,
                question=ex.question,
                golds=list(ex.golds),
                data_source=ex.data_source,
                group_id=group,
            )
            for group, ex in enumerate(examples)
            for _ in range(group_size)
        ]
        prompt_ids = self._encode_prompts([t.question for t in trajectories])
        responses: list[list[Segment]] = [[] for _ in trajectories]
        texts: list[list[str]] = [[] for _ in trajectories]
        was_training = self.model.training
        self.model.eval()
        try:
            self._roll_out(prompt_ids, responses, texts, trajectories, greedy, generator)
        finally:
            self.model.train(was_training)
        for trajectory, pieces in zip(trajectories, texts, strict=True):
            trajectory.response_text = "".join(pieces)
            score_trajectory(
                trajectory,
                detect_in=self.config.detect_in,
                min_answer_chars=self.config.min_answer_chars,
            )
        return assemble_batch(prompt_ids, responses, trajectories, self.pad_id)

    def _encode_prompts(self, questions: list[str]) -> list[list[int]]:
        chat = self.config.use_chat_template
        if chat and not getattr(self.tokenizer, "chat_template", None):
            raise TSPOError("rollout.use_chat_template needs a tokenizer with a chat template")
        prompts = [build_prompt(q, self.tokenizer, use_chat_template=chat) for q in questions]
        return [self.tokenizer.encode(p, add_special_tokens=not chat) for p in prompts]

    def _roll_out(
        self,
        prompt_ids: list[list[int]],
        responses: list[list[Segment]],
        texts: list[list[str]],
        trajectories: list[Trajectory],
        greedy: bool,
        generator: torch.Generator | None,
    ) -> None:
        """Fill ``responses``, ``texts`` and the per-turn fields of ``trajectories`` in place."""
        cfg = self.config
        alive = list(range(len(prompt_ids)))  # rollout index of each row of the context
        context = self._new_context(len(alive))
        logits = context.extend(prompt_ids)
        for turn in range(cfg.max_turns + 1):
            if turn > 0 and not cfg.kv_cache:
                context = self._new_context(len(alive))
                logits = context.extend([_full_context(prompt_ids[r], responses[r]) for r in alive])
            generated, logprobs = self._decode_turn(context, logits, greedy, generator)
            turn_texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            replies = reply_to_actions(
                [parse_action(text) for text in turn_texts],
                final_turn=turn == cfg.max_turns,
                retriever=self.retriever,
                topk=cfg.topk,
                tokenizer=self.tokenizer,
                max_obs_tokens=cfg.max_obs_tokens,
            )
            keep, chunks = [], []
            for row, rollout in enumerate(alive):
                reply, trajectory = replies[row], trajectories[rollout]
                responses[rollout].append(Segment(generated[row], turn, logprobs[row]))
                texts[rollout].append(turn_texts[row])
                trajectory.generated.append(turn_texts[row])
                trajectory.queries.append(reply.query)
                trajectory.observations.append(reply.observation)
                if reply.done:
                    continue
                assert reply.text is not None, "a reply that continues the rollout has text"
                reply_ids = self.tokenizer.encode(reply.text, add_special_tokens=False)
                responses[rollout].append(Segment(reply_ids, turn))
                texts[rollout].append(reply.text)
                keep.append(row)
                # The turn's last token was sampled but never fed to the model.
                chunks.append([generated[row][-1], *reply_ids])
            alive = [alive[row] for row in keep]
            if not alive:
                return
            if cfg.kv_cache:
                context.select(torch.tensor(keep, dtype=torch.long))
                logits = context.extend(chunks)
                context.compact()

    def _new_context(self, rows: int) -> CachedContext:
        context = CachedContext(self.model, self.pad_id, rows)
        context.reserve(self.config.max_turn_tokens)  # a turn's decoding then writes in place
        return context

    def _decode_turn(
        self,
        context: CachedContext,
        logits: torch.Tensor,
        greedy: bool,
        generator: torch.Generator | None,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Decode one turn for every row of ``context``; the last token of a row is not fed.

        Rows that end their turn early would cost a hole per step until the slowest row ends, so
        once half of the decoding batch has stopped, the running rows move to a smaller context
        (``split``) and come back at the end of the turn (``merge``).
        """
        cfg = self.config
        stops = self._stop_checker()
        tokens: list[list[int]] = [[] for _ in range(context.batch_size)]
        logprobs: list[list[float]] = [[] for _ in range(context.batch_size)]
        splits: list[tuple[CachedContext, torch.Tensor]] = []  # (parent, rows of the parent)
        members = list(range(context.batch_size))  # row of ``context`` held by each active row
        running = list(members)  # active rows still in their turn
        for step in range(cfg.max_turn_tokens):
            new, new_logprobs = next_tokens(
                logits,
                greedy=greedy,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                generator=generator,
            )
            new_list, logprob_list = new.tolist(), new_logprobs.tolist()
            active_tokens = [tokens[member] for member in members]
            for row in running:
                active_tokens[row].append(new_list[row])
                logprobs[members[row]].append(logprob_list[row])
            if step == cfg.max_turn_tokens - 1:
                break
            ended = set(stops.stopped(new_list, active_tokens, running))
            ended.update(row for row in running if new_list[row] in self.eos_ids)
            running = [row for row in running if row not in ended]
            if not running:
                break
            if len(running) <= len(members) // 2:
                kept = torch.tensor(running, dtype=torch.long)
                splits.append((context, kept))
                context = context.split(kept)
                members = [members[row] for row in running]
                new = new[kept.to(new.device)]
                running = list(range(len(members)))
            fed = torch.zeros(len(members), dtype=torch.bool)
            fed[running] = True
            logits = context.step(new, fed.to(new.device))
        while splits:
            parent, kept = splits.pop()
            parent.merge(context, kept)
            context = parent
        return tokens, logprobs

    def _stop_checker(self) -> StopChecker:
        if self._stops is None:
            self._stops = StopChecker(self.tokenizer, STOP_STRINGS)
        return self._stops


def _full_context(prompt: list[int], segments: list[Segment]) -> list[int]:
    return prompt + [t for segment in segments for t in segment.token_ids]


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids
