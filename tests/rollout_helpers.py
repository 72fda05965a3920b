"""Real, small components for rollout tests: a word-overlap retriever and a scriptable tiny LM.

``ScriptedLlama`` is a genuine ``LlamaForCausalLM`` (real attention, real KV cache); only its
output logits get an extra bias looked up from the *current input token* (a bigram table). A
strong bias makes the model follow a script; a weak one keeps the random network's
context-dependent preferences in play.
"""

from __future__ import annotations

import re

import torch
from transformers import LlamaForCausalLM

from tspo.models.tiny import build_tiny_model, train_tokenizer
from tspo.protocol import build_prompt, wrap_information
from tspo.retrieval.base import Hit, Retriever

DOCS = [
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("Paris", "Paris is the capital and largest city of France."),
    ("Nile", "The Nile is a major river in north-eastern Africa."),
    ("Everest", "Mount Everest is the highest mountain above sea level."),
]
# Single tokens in the test tokenizer, so transitions can be written as text.
WORDS = ["ponder", "hamlet", "shakespeare", "junk", "\n\n"]


class WordOverlapRetriever(Retriever):
    """Ranks documents by how many lower-cased words they share with the query (ties by order)."""

    def __init__(self, docs: list[tuple[str, str]]):
        self.docs = docs
        self.calls: list[list[str]] = []

    def search(self, queries: list[str], topk: int = 3) -> list[list[Hit]]:
        self.calls.append(list(queries))
        results = []
        for query in queries:
            overlap = [len(_words(query) & _words(f"{t} {x}")) for t, x in self.docs]
            best = sorted(range(len(self.docs)), key=lambda i: -overlap[i])[:topk]  # stable
            results.append([Hit(str(i), *self.docs[i], float(overlap[i])) for i in best])
        return results


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def make_tokenizer(*, protocol_tags: bool = True, merges: bool = True):
    """A byte-level test tokenizer; ``merges=False`` keeps every non-added character one token."""
    texts = [build_prompt(q) for q in ("Who wrote Hamlet?", "Where is the Nile?")]
    texts += [wrap_information(f"Doc 1(Title: {t}) {x}") for t, x in DOCS]
    texts = texts * 4
    extra = WORDS if protocol_tags else []
    if merges:
        return train_tokenizer(texts, 700, extra_tokens=extra, protocol_tags=protocol_tags)
    floor = 258 + len(extra) + (8 if protocol_tags else 0)
    return train_tokenizer(texts, floor, extra_tokens=extra, protocol_tags=protocol_tags)


def token_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens"
    return ids[0]


class ScriptedLlama(LlamaForCausalLM):
    """A tiny Llama whose logits get ``bias[input token]`` added (a (V, V) bigram table)."""

    def __init__(self, config, bias: torch.Tensor):
        super().__init__(config)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        out.logits = out.logits + self.bias[input_ids[:, -out.logits.shape[1] :]]
        return out


def scripted_model(
    tokenizer,
    transitions: dict[str, list[str]],
    *,
    strength: float = 30.0,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> ScriptedLlama:
    """A "micro" Llama biased by ``strength`` toward ``transitions[token] -> next tokens``."""
    base = build_tiny_model(tokenizer, "micro", seed=seed, initializer_range=initializer_range)
    vocab = base.config.vocab_size
    bias = torch.zeros(vocab, vocab)
    for source, targets in transitions.items():
        for target in targets:
            bias[token_id(tokenizer, source), token_id(tokenizer, target)] = strength
    model = ScriptedLlama(base.config, bias)
    model.load_state_dict(base.state_dict())
    return model.eval()


def check_batch_consistency(batch, tokenizer) -> None:
    """Invariants every `RolloutBatch` must satisfy, checked row by row against its trajectory."""
    for row, trajectory in enumerate(batch.trajectories):
        prompt_mask, response_mask = batch.prompt_mask[row], batch.response_mask[row]
        loss, turns = batch.loss_mask[row], batch.turn_ids[row]
        # Prompt left-padded, response right-padded, both without holes.
        assert torch.equal(prompt_mask, prompt_mask.sort().values)
        assert torch.equal(response_mask, response_mask.sort(descending=True).values)
        prompt = batch.prompt_ids[row][prompt_mask.bool()].tolist()
        assert tokenizer.decode(prompt) == build_prompt(trajectory.question)
        # Loss tokens are real tokens; turn ids and old log-probs live only on them.
        assert bool((loss <= response_mask).all())
        assert torch.equal(turns >= 0, loss.bool())
        assert bool((batch.old_logprobs[row][~loss.bool()] == 0).all())
        assert bool((batch.old_logprobs[row][loss.bool()] <= 0).all())
        on_loss = turns[loss.bool()]
        assert torch.equal(on_loss, on_loss.sort().values)
        # Each turn's loss tokens decode to that turn's generated text, and everything else to
        # the environment's replies in between.
        assert sorted(set(on_loss.tolist())) == list(range(trajectory.num_turns))
        for turn, text in enumerate(trajectory.generated):
            ids = batch.response_ids[row][turns == turn].tolist()
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
        response = batch.response_ids[row][response_mask.bool()].tolist()
        assert tokenizer.decode(response, skip_special_tokens=True) == trajectory.response_text
        env_ids = batch.response_ids[row][response_mask.bool() & ~loss.bool()].tolist()
        env_text = tokenizer.decode(env_ids)
        expected_env = [wrap_information(o) for o in trajectory.observations if o is not None]
        assert all(block in env_text for block in expected_env)
        assert len(trajectory.queries) == len(trajectory.observations) == trajectory.num_turns
        assert float(batch.outcome[row]) == trajectory.outcome
        assert int(batch.first_hit_turn[row]) == trajectory.first_hit_turn
        assert int(batch.group_ids[row]) == trajectory.group_id


@torch.no_grad()
def teacher_forced_logprobs(model, batch) -> torch.Tensor:
    """(B, T) log-probs of each response token from one plain forward of its unpadded row."""
    out = torch.zeros_like(batch.old_logprobs)
    for row in range(len(batch)):
        prompt = batch.prompt_ids[row][batch.prompt_mask[row].bool()]
        response = batch.response_ids[row][batch.response_mask[row].bool()]
        ids = torch.cat([prompt, response])[None]
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
        picked = logprobs[len(prompt) - 1 : -1].gather(-1, response[:, None]).squeeze(-1)
        out[row, : len(response)] = picked
    return out * batch.loss_mask
