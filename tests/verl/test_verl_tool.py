"""The search tool for veRL's agent loop: the <search> parser and the example tool over HTTP."""

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from verl.experimental.agent_loop.tool_parser import ToolParser
from verl.tools.function_tool import load_function_tools_from_path

from tspo.data.corpus import CorpusDoc
from tspo.errors import TSPOError
from tspo.integrations.verl.reward import compute_score, split_turns
from tspo.integrations.verl.tool import RetrieverSearch, SearchTagParser
from tspo.models.tiny import train_tokenizer
from tspo.protocol import SEARCH_CLOSE
from tspo.retrieval.bm25 import BM25Retriever
from tspo.retrieval.server import create_app

pytestmark = pytest.mark.verl

EXAMPLE_TOOL = Path(__file__).parents[2] / "examples" / "verl" / "search_tool.py"
DOCS = [
    CorpusDoc("d1", "Canberra", "Canberra is the capital city of Australia."),
    CorpusDoc("d2", "Sydney", "Sydney is the largest city in Australia."),
    CorpusDoc("d3", "Wellington", "Wellington is the capital of New Zealand."),
]
TURN = "<think>Look it up.</think> <search> capital city of Australia </search>"


@pytest.fixture(scope="module", params=[True, False], ids=["tags-as-tokens", "tags-as-bpe"])
def parser(request):
    tokenizer = train_tokenizer(
        [TURN, "<answer> Canberra </answer>"] * 4, vocab_size=300, protocol_tags=request.param
    )
    return ToolParser.get_tool_parser("tspo_search", tokenizer)


def test_a_search_tag_becomes_one_call_of_the_search_tool(parser):
    assert isinstance(parser, SearchTagParser)
    text, calls = asyncio.run(parser.extract_tool_calls(parser.tokenizer.encode(TURN)))
    assert text == TURN
    assert [(call.name, call.arguments) for call in calls] == [
        ("search", '{"query": "capital city of Australia"}')
    ]


def test_an_answer_calls_no_tool(parser):
    ids = parser.tokenizer.encode("<answer> Canberra </answer>")
    assert asyncio.run(parser.extract_tool_calls(ids))[1] == []


def test_generation_stops_after_search_only_where_the_tag_is_one_token(parser):
    close_ids = parser.tokenizer.encode(SEARCH_CLOSE, add_special_tokens=False)
    assert parser.stop_token_ids == (close_ids if len(close_ids) == 1 else [])


@pytest.fixture(scope="module")
def retriever_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(BM25Retriever.from_docs(DOCS))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the retriever server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_the_example_tool_answers_with_one_information_block_from_tspo_serve(
    retriever_url, monkeypatch
):
    monkeypatch.setenv("TSPO_RETRIEVER_URL", retriever_url)
    monkeypatch.setenv("TSPO_RETRIEVER_TOPK", "2")
    (tool,) = load_function_tools_from_path(str(EXAMPLE_TOOL))
    assert tool.name == "search"
    assert list(tool.tool_schema.function.parameters.properties) == ["query"]
    block = asyncio.run(tool.call({"query": "capital city of Australia"}))
    assert block.startswith("\n\n<information>Doc 1(Title: Canberra) Canberra is the capital")
    assert "Doc 2(Title: " in block and "Doc 3" not in block

    response = TURN + block + "<answer> Canberra </answer>"
    turns = split_turns(response)
    # The blank lines around the block are the environment's, outside the block.
    assert turns.generated == [TURN + "\n\n", "\n\n<answer> Canberra </answer>"]
    result = compute_score("nq", response, ["Canberra"], {"question": "Capital of Australia?"})
    assert (result["score"], result["first_hit_turn"]) == (5.0, 0.0)


@pytest.mark.parametrize(
    ("env", "message"),
    [({}, "TSPO_RETRIEVER_URL"), ({"TSPO_RETRIEVER_TOPK": "0"}, "positive integer")],
)
def test_the_tool_needs_a_server_url_and_a_sane_topk(monkeypatch, env, message):
    monkeypatch.delenv("TSPO_RETRIEVER_URL", raising=False)
    if env:
        monkeypatch.setenv("TSPO_RETRIEVER_URL", "http://127.0.0.1:9")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(TSPOError, match=message):
        RetrieverSearch.from_env()
