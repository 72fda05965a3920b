"""KV-cache reuse against the re-encode reference, the cache-with-holes context, and real BM25."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import (
    DOCS,
    WordOverlapRetriever,
    check_batch_consistency,
    make_tokenizer,
    scripted_model,
    teacher_forced_logprobs,
)

from tspo.data.corpus import CorpusDoc
from tspo.data.qa import QAExample
from tspo.models.tiny import build_tiny_model
from tspo.retrieval.bm25 import BM25Retriever
from tspo.rollout import RolloutConfig, RolloutEngine
from tspo.rollout.context import CachedContext

QUESTIONS = ["Who wrote Hamlet?", "Where is the Nile?", "What is France's capital?", "Everest?"]
EXAMPLES = [QAExample(str(i), q, ["Shakespeare"]) for i, q in enumerate(QUESTIONS)]
# A weak bias over a strong random network: which branch a row takes depends on its whole
# context, so rows search, answer and fail at different turns.
BRANCHING = {
    "\n": ["<think>"],
    "<think>": ["ponder"],
    "ponder": ["</think>", "junk"],
    "</think>": ["<search>", "<answer>", "junk"],
    "<search>": ["hamlet"],
    "hamlet": ["</search>", "ponder"],
    "\n\n": ["<think>"],
    "<answer>": ["shakespeare"],
    "shakespeare": ["</answer>"],
    "junk": ["</think>", "ponder"],
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(merges=False)


@pytest.fixture(scope="module")
def model(tok):
    return scripted_model(tok, BRANCHING, strength=8.0, initializer_range=0.1)


def generate(model, tok, kv_cache, greedy, seed=0):
    config = RolloutConfig(max_turns=3, max_turn_tokens=10, max_obs_tokens=40, kv_cache=kv_cache)
    engine = RolloutEngine(model, tok, WordOverlapRetriever(DOCS), config)
    return engine.generate(
        EXAMPLES, 2, greedy=greedy, generator=torch.Generator().manual_seed(seed)
    )


# (greedy, bias strength, weight scale): settings under which rows diverge in each mode.
@pytest.mark.parametrize(
    ("greedy", "strength", "scale"),
    [(True, 6.0, 0.2), (False, 8.0, 0.1)],
    ids=["greedy", "sampled"],
)
def test_kv_reuse_equals_reencoding(tok, greedy, strength, scale):
    model = scripted_model(tok, BRANCHING, strength=strength, initializer_range=scale)
    reused = generate(model, tok, kv_cache=True, greedy=greedy)
    reencoded = generate(model, tok, kv_cache=False, greedy=greedy)
    turns = [t.num_turns for t in reused.trajectories]
    assert len(set(turns)) > 1  # the rows really did finish turns at different times
    assert any(t.num_searches for t in reused.trajectories)
    assert torch.equal(reused.response_ids, reencoded.response_ids)
    assert torch.equal(reused.loss_mask, reencoded.loss_mask)
    assert [t.generated for t in reused.trajectories] == [
        t.generated for t in reencoded.trajectories
    ]
    torch.testing.assert_close(reused.old_logprobs, reencoded.old_logprobs, atol=1e-4, rtol=0)
    # Both agree with a plain unpadded forward pass of each finished sequence.
    torch.testing.assert_close(
        teacher_forced_logprobs(model, reused), reused.old_logprobs, atol=1e-4, rtol=0
    )


def test_context_with_holes_matches_plain_forward(tok):
    model = build_tiny_model(tok, "micro", seed=1, initializer_range=0.2).eval()
    streams = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    additions = [[[20, 21], [], [22]], [[23], [24, 25, 26], []], [[], [27], [28, 29]]]
    context = CachedContext(model, tok.pad_token_id, len(streams))
    context.extend(streams)
    for step, chunk in enumerate(additions):
        logits = context.extend(chunk)
        if step == 1:
            fed = torch.tensor([True, False, True])
            logits = context.step(torch.tensor([30, 31, 32]), fed)
            for row in (0, 2):
                chunk[row] = [*chunk[row], 30 + row]
        for row in range(len(streams)):
            streams[row] = streams[row] + chunk[row]
        context.compact()
    assert context.positions.tolist() == [len(s) for s in streams]
    assert context.mask.shape[1] == max(len(s) for s in streams)  # holes squeezed out
    with torch.no_grad():
        for row in (1, 2):  # rows whose last forward carried a real token
            plain = model(input_ids=torch.tensor([streams[row]])).logits[0, -1]
            torch.testing.assert_close(logits[row], plain, atol=1e-4, rtol=0)


def test_split_and_merge_keep_every_row_exact(tok):
    model = build_tiny_model(tok, "micro", seed=2, initializer_range=0.2).eval()
    streams = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    context = CachedContext(model, tok.pad_token_id, len(streams))
    context.extend(streams)
    kept = torch.tensor([0, 2])
    child = context.split(kept)
    child.extend([[20, 21], [22]])
    child.step(torch.tensor([23, 24]), torch.tensor([False, True]))
    context.merge(child, kept)
    streams[0] += [20, 21]
    streams[2] += [22, 24]
    logits = context.extend([[30], [31], [32], [33]])
    context.compact()
    assert context.positions.tolist() == [len(s) + 1 for s in streams]
    with torch.no_grad():
        for row, stream in enumerate(streams):
            plain = model(input_ids=torch.tensor([[*stream, 30 + row]])).logits[0, -1]
            torch.testing.assert_close(logits[row], plain, atol=1e-4, rtol=0)


def test_real_bm25_retriever(tok, model):
    docs = [CorpusDoc(str(i), title, text) for i, (title, text) in enumerate(DOCS)]
    config = RolloutConfig(max_turns=2, max_turn_tokens=10, max_obs_tokens=200, topk=2)
    engine = RolloutEngine(model, tok, BM25Retriever.from_docs(docs), config)
    batch = engine.generate(EXAMPLES, 2, generator=torch.Generator().manual_seed(1))
    check_batch_consistency(batch, tok)
    searched = [
        (q, o)
        for t in batch.trajectories
        for q, o in zip(t.queries, t.observations, strict=True)
        if o is not None
    ]
    assert searched
    for query, observation in searched:
        assert query == "hamlet"
        assert observation.startswith("Doc 1(Title: Hamlet) Hamlet is a tragedy")
        assert "Doc 2(Title: " in observation and "Doc 3(" not in observation
