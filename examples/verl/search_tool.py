"""The ``search`` tool for veRL's tool agent loop: ``tspo serve`` behind the Search-R1 protocol.

veRL loads this file in each agent-loop worker
(``actor_rollout_ref.rollout.multi_turn.function_tool_path=examples/verl/search_tool.py``).
Importing ``tspo.integrations.verl.tool`` registers the ``tspo_search`` tool-call format
(``multi_turn.format=tspo_search``): ``<search>query</search>`` becomes a call of this tool.
The server comes from ``$TSPO_RETRIEVER_URL`` and the passage count from ``$TSPO_RETRIEVER_TOPK``.
"""

from verl.tools.function_tool import function_tool

from tspo.integrations.verl.tool import RetrieverSearch

_search = RetrieverSearch.from_env()


@function_tool("search")
def search(query: str) -> str:
    """Search the corpus and return the top passages as an <information> block.

    Args:
        query: What to look for, in a few words.
    """
    return _search(query)
