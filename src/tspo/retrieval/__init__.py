"""Retrieval: one `Retriever` interface, BM25 and dense backends, an HTTP server and client."""

from tspo.retrieval.base import Hit, Retriever

__all__ = ["Hit", "Retriever"]
