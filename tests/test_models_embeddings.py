"""Fresh embeddings for tokens a base never trained on (tspo.models.embeddings)."""

from __future__ import annotations

import pytest
import torch

from tspo.models.embeddings import resample_token_embeddings
from tspo.protocol import PROTOCOL_TAGS
from tspo.train.sft import single_token_ids


def _cosines(vectors: torch.Tensor) -> torch.Tensor:
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    return unit @ unit.T


def test_the_shipped_base_cannot_tell_its_protocol_tags_apart():
    """Why SFT re-samples them: in the shipped base every tag is the same vector."""
    from tspo.models.loading import load_policy

    model, tokenizer = load_policy("tspo-tiny-base", device="cpu")
    ids = torch.tensor(single_token_ids(tokenizer, PROTOCOL_TAGS))
    before = model.get_input_embeddings().weight[ids].detach().clone()
    assert _cosines(before).min() > 0.99

    resample_token_embeddings(model, ids.tolist(), seed=0)
    weights = model.get_input_embeddings().weight.detach()
    after = weights[ids]
    off_diagonal = ~torch.eye(len(ids), dtype=torch.bool)
    assert _cosines(after)[off_diagonal].max() < 0.9
    # Tied: the output layer sees the same fresh vectors.
    assert torch.equal(model.get_output_embeddings().weight[ids].detach(), after)
    # Sampled from the trained tokens' range, not far outside it.
    trained_norm = weights[: min(ids)].norm(dim=-1).median()
    assert (after.norm(dim=-1) < 4 * trained_norm).all()
    # Every other token is untouched, and the draw is reproducible.
    others = torch.ones(len(weights), dtype=torch.bool)
    others[ids] = False
    fresh, _ = load_policy("tspo-tiny-base", device="cpu")
    assert torch.equal(fresh.get_input_embeddings().weight[others].detach(), weights[others])
    resample_token_embeddings(fresh, ids.tolist(), seed=0)
    assert torch.equal(fresh.get_input_embeddings().weight.detach(), weights)


def test_single_token_ids_rejects_a_tag_split_into_pieces():
    from tspo.errors import TSPOError
    from tspo.models.tiny import train_tokenizer

    texts = ["plain words only, no tags here"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=300, protocol_tags=False)
    with pytest.raises(TSPOError, match="not one"):
        single_token_ids(tokenizer, ["<search>"])


def test_a_vocabulary_without_enough_distinct_embeddings_is_a_clear_error():
    from tspo.errors import TSPOError

    class Collapsed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, 8)
            with torch.no_grad():
                self.embed.weight[:] = 1.0  # every token the same vector

        def get_input_embeddings(self):
            return self.embed

    model = Collapsed()
    before = model.embed.weight.detach().clone()
    with pytest.raises(TSPOError, match="only 0 other tokens have distinct ones"):
        resample_token_embeddings(model, [3, 4], seed=0)
    assert torch.equal(model.embed.weight.detach(), before)  # nothing half-changed
