"""Search for veRL's tool agent loop, speaking the Search-R1 protocol (docs/algorithm.md §1).

Two pieces, wired together by ``examples/verl/search_tool.py``:

- :class:`SearchTagParser`, registered as the tool-call format ``tspo_search``
  (``actor_rollout_ref.rollout.multi_turn.format=tspo_search``): it reads the action our prompt
  teaches, ``<search>query</search>``, as a call of the ``search`` tool. A turn without a search
  (an answer, or an invalid action) calls no tool, which ends veRL's loop.
- :class:`RetrieverSearch`: answers a query with one whole ``<information>`` block of top-k
  passages from any :class:`tspo.retrieval.base.Retriever`, usually an ``HttpRetriever`` talking
  to ``tspo serve``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from verl.experimental.agent_loop.tool_parser import FunctionCall, ToolParser

from tspo.errors import TSPOError
from tspo.protocol import SEARCH_CLOSE, format_documents, parse_action, wrap_information
from tspo.retrieval.base import Retriever

SEARCH_TOOL_NAME = "search"
TOOL_CALL_FORMAT = "tspo_search"
RETRIEVER_URL_ENV = "TSPO_RETRIEVER_URL"
RETRIEVER_TOPK_ENV = "TSPO_RETRIEVER_TOPK"


@ToolParser.register(TOOL_CALL_FORMAT)
class SearchTagParser(ToolParser):
    """veRL tool-call parser for ``<search>query</search>``: at most one ``search`` call a turn."""

    @property
    def stop_token_ids(self) -> list[int]:
        """Stop right after ``</search>`` when the tokenizer has it as one token."""
        ids = self.tokenizer.encode(SEARCH_CLOSE, add_special_tokens=False)
        return list(ids) if len(ids) == 1 else []

    async def extract_tool_calls(self, responses_ids, tools=None) -> tuple[str, list[FunctionCall]]:
        text = self.tokenizer.decode(responses_ids)
        action = parse_action(text)
        if action.kind != "search":
            return text, []
        arguments = json.dumps({"query": action.content}, ensure_ascii=False)
        return text, [FunctionCall(name=SEARCH_TOOL_NAME, arguments=arguments)]


@dataclass
class RetrieverSearch:
    """``search(query) -> "\\n\\n<information>Doc 1(Title: T) text…</information>\\n\\n"``."""

    retriever: Retriever
    topk: int = 3

    def __call__(self, query: str) -> str:
        hits = self.retriever.search([query], self.topk)[0]
        return wrap_information(format_documents([(hit.title, hit.text) for hit in hits]))

    @classmethod
    def from_env(cls) -> RetrieverSearch:
        """An ``HttpRetriever`` on ``$TSPO_RETRIEVER_URL``, ``$TSPO_RETRIEVER_TOPK`` passages."""
        from tspo.retrieval.client import HttpRetriever

        url = os.environ.get(RETRIEVER_URL_ENV)
        if not url:
            raise TSPOError(f"set {RETRIEVER_URL_ENV} to the URL of `tspo serve`")
        topk = os.environ.get(RETRIEVER_TOPK_ENV, "3")
        if not topk.isdigit() or int(topk) < 1:
            raise TSPOError(f"{RETRIEVER_TOPK_ENV} must be a positive integer, got {topk!r}")
        return cls(HttpRetriever(url), int(topk))
