"""Fresh, distinct embeddings for tokens a base model never trained on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tspo.errors import TSPOError

COLLAPSED_COSINE = 0.99


def resample_token_embeddings(model: Any, token_ids: Sequence[int], *, seed: int = 0) -> None:
    """Give ``token_ids`` new input embeddings drawn from N(mean, covariance) of all the others.

    A base model never trained on a token still moves its embedding: with tied embeddings, every
    step's softmax pushes all unseen tokens the same way, and after thousands of AdamW steps they
    end up as one vector (the shipped tiny base's protocol tags: pairwise cosine 1.00). A policy
    that cannot tell ``<search>`` from ``<answer>`` in its own history cannot close the tag it
    opened. Sampling from the trained embeddings' distribution is how transformers initialises
    newly added tokens; it keeps them in the familiar range and makes them distinct.

    The mean and covariance come from the tokens whose embedding is not that same collapsed vector
    (cosine under ``COLLAPSED_COSINE`` to the centroid of ``token_ids``): a small vocabulary's
    never-seen byte tokens share it too (392 of the tiny base's 1,000) and would otherwise pull
    the samples back onto it. Changes the (tied) embedding matrix in place; ``seed`` makes the
    draw reproducible.
    """
    ids = sorted(set(token_ids))
    if not ids:
        return
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        weights = embedding.detach().double()
        centroid = weights[ids].mean(dim=0)
        cosine = (weights @ centroid) / (weights.norm(dim=1) * centroid.norm()).clamp(min=1e-12)
        others = cosine < COLLAPSED_COSINE
        others[ids] = False
        if int(others.sum()) <= weights.shape[1]:
            raise TSPOError(
                f"cannot give {len(ids)} tokens fresh embeddings: only {int(others.sum())} other "
                f"tokens have distinct ones, fewer than the {weights.shape[1]} dimensions"
            )
        trained = weights[others]
        mean = trained.mean(dim=0)
        covariance = torch.cov(trained.T) + 1e-6 * torch.eye(trained.shape[1], dtype=torch.double)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(ids), trained.shape[1], generator=generator, dtype=torch.double)
        samples = mean + noise @ torch.linalg.cholesky(covariance).T
        embedding[ids] = samples.to(embedding.dtype).to(embedding.device)
