"""The search-agent protocol: prompt, tag parsing, observation formatting. No I/O.

The protocol itself (Search-R1's) is described in docs/algorithm.md §1.

Every parser here is linear in the length of its input: it uses ``str.find``/``str.rfind`` only, so
hostile text (unclosed or nested tags, megabytes of output) cannot blow up into quadratic work.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
PROTOCOL_TAGS = (
    THINK_OPEN,
    THINK_CLOSE,
    SEARCH_OPEN,
    SEARCH_CLOSE,
    ANSWER_OPEN,
    ANSWER_CLOSE,
    INFO_OPEN,
    INFO_CLOSE,
)
# A turn ends right after the first of these (docs/algorithm.md §1).
STOP_STRINGS = (SEARCH_CLOSE, ANSWER_CLOSE)

PROMPT_TEMPLATE = (
    "Answer the question below. Think step by step inside <think> and </think>. "
    "When you lack a fact, search for it by writing a query between <search> and </search>; "
    "the results come back between <information> and </information>. "
    "Search as often as you need. When you are sure, write only the final answer between "
    "<answer> and </answer>, for example <answer> Paris </answer>.\n"
    "Question: {question}\n"
)

# The corrective message names no tag: a small model copies what it reads, and a message that
# spells the tags out invites it to repeat them (``<search><search>…``).
INVALID_ACTION_MESSAGE = (
    "\nThat was not a valid action. Write one search query or one final answer, "
    "in the format the instructions show. Let me try again.\n"
)

ActionKind = Literal["search", "answer", "invalid"]
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class Action:
    """The first action found in one generation."""

    kind: ActionKind
    content: str = ""


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int], /, skip_special_tokens: bool = ...) -> str | list[str]: ...


def build_prompt(question: str, tokenizer: Any = None, *, use_chat_template: bool = False) -> str:
    """The prompt for one question; through ``tokenizer``'s chat template for instruct models."""
    text = PROMPT_TEMPLATE.format(question=question.strip())
    if not use_chat_template:
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("use_chat_template=True needs a tokenizer that has a chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def _tag_block(text: str, open_tag: str, close_tag: str, start: int = 0) -> tuple[int, str] | None:
    """First complete ``open…close`` block at or after ``start``: (position of open, inner text).

    With nested opening tags (``<search><search>q</search>``) the innermost opening tag before the
    closing one wins, so the content is ``q``.
    """
    open_at = text.find(open_tag, start)
    if open_at < 0:
        return None
    close_at = text.find(close_tag, open_at + len(open_tag))
    if close_at < 0:
        return None
    inner_open = text.rfind(open_tag, open_at, close_at)
    return open_at, text[inner_open + len(open_tag) : close_at].strip()


def parse_action(generation: str) -> Action:
    """The first action of one turn's generation: a search, an answer, or invalid.

    The action whose complete ``<tag>…</tag>`` block opens first wins. A search with an empty query
    is invalid.
    """
    blocks = [
        (found[0], kind, found[1])
        for kind, (open_tag, close_tag) in (
            ("search", (SEARCH_OPEN, SEARCH_CLOSE)),
            ("answer", (ANSWER_OPEN, ANSWER_CLOSE)),
        )
        if (found := _tag_block(generation, open_tag, close_tag)) is not None
    ]
    if not blocks:
        return Action("invalid")
    _, kind, content = min(blocks)
    if kind == "search" and not content:
        return Action("invalid")
    return Action(kind, content)  # type: ignore[arg-type]


def extract_last_answer(response: str) -> str | None:
    """The text of the last complete ``<answer>…</answer>`` in ``response``, or None.

    Call it on the model's response only, never on the prompt: the prompt carries an example answer.
    """
    last_close = response.rfind(ANSWER_CLOSE)
    if last_close < 0:
        return None
    open_at = response.rfind(ANSWER_OPEN, 0, last_close)
    if open_at < 0:
        return None
    # The block closes at the first closing tag after its opening tag: in
    # ``<answer>a</answer></answer>`` the stray last tag is not part of the answer.
    close_at = response.find(ANSWER_CLOSE, open_at + len(ANSWER_OPEN))
    return response[open_at + len(ANSWER_OPEN) : close_at].strip()


_TAG_NAMES = ("think", "search", "answer", "information")
_TAG_PATTERN = r"</?(?:" + "|".join(_TAG_NAMES) + r")>"
# Chat-template control tokens of ChatML, Qwen and Llama 3 (<|im_end|>, <|endoftext|>,
# <|eot_id|>, ...), stripped even when no tokenizer is at hand.
_CONTROL_TOKEN_PATTERN = r"<\|[^<>|\s]{1,64}\|>"
_MAX_STRIP_PASSES = 16


def special_tokens_of(tokenizer: Any) -> tuple[str, ...]:
    """The special tokens of a Hugging Face tokenizer: ``all_special_tokens`` plus every added
    token marked special (ChatML's ``<|im_start|>`` is often only the latter)."""
    if tokenizer is None:
        return ()
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(token.content for token in added.values() if getattr(token, "special", False))
    return tuple(sorted(token for token in tokens if isinstance(token, str)))


@functools.lru_cache(maxsize=32)
def _strip_pattern(special_tokens: tuple[str, ...]) -> re.Pattern[str]:
    generic = re.compile(f"{_TAG_PATTERN}|{_CONTROL_TOKEN_PATTERN}", re.IGNORECASE)
    literals = {t.strip() for t in special_tokens if len(t.strip()) >= 2}
    # Longest first, so a token wins over its prefix; those the generic patterns match are left
    # to them (Llama 3 has 256 <|reserved_special_token_N|>), which keeps the scan short.
    parts = [
        re.escape(token)
        for token in sorted(literals, key=lambda t: (-len(t), t))
        if not generic.fullmatch(token)
    ]
    return re.compile("|".join([*parts, _TAG_PATTERN, _CONTROL_TOKEN_PATTERN]), re.IGNORECASE)


def strip_protocol_tags(text: str, special_tokens: Iterable[str] = ()) -> str:
    """``text`` with every protocol tag and control token replaced by a space.

    Retrieved documents go through this, so a passage containing ``</answer>`` or
    ``<information>`` can never be parsed as an action, an answer or an observation boundary,
    and a passage containing a chat control token (``<|im_end|>``) can never be encoded as that
    token. Tags match in any letter case (``</ANSWER>``, ``<Search>``).
    Removed as well: ``<|...|>`` control tokens, and each of ``special_tokens`` (pass
    :func:`special_tokens_of` the tokenizer that will encode the text; tokens shorter than two
    characters are kept). Each removal leaves a space, so the two sides cannot join into a new
    tag; a special token with a blank inside could, so the scan repeats until nothing matches.
    """
    pattern = _strip_pattern(tuple(sorted(set(special_tokens))))
    for _ in range(_MAX_STRIP_PASSES):
        text, removed = pattern.subn(" ", text)
        if not removed:
            return text
    # Only text nesting a special token with a blank inside 16 deep gets here: drop every '<'.
    return pattern.sub(" ", text).replace("<", " ")


def format_documents(docs: Sequence[tuple[str, str]], special_tokens: Iterable[str] = ()) -> str:
    """``Doc i(Title: T) text`` lines for (title, text) pairs, numbered from 1, with protocol tags
    and control tokens (and ``special_tokens``) stripped: see :func:`strip_protocol_tags`."""
    special_tokens = tuple(special_tokens)
    return "\n".join(
        f"Doc {i}(Title: {strip_protocol_tags(title, special_tokens)}) "
        f"{strip_protocol_tags(text, special_tokens)}"
        for i, (title, text) in enumerate(docs, 1)
    )


def wrap_information(observation: str) -> str:
    """The block the environment appends after a search (docs/algorithm.md §1)."""
    return f"\n\n{INFO_OPEN}{observation.strip()}{INFO_CLOSE}\n\n"


def truncate_to_tokens(text: str, tokenizer: _Tokenizer, max_tokens: int) -> str:
    """``text`` cut to at most ``max_tokens`` tokens of ``tokenizer`` (unchanged when it fits).

    A byte-level tokenizer may split one character over several tokens; a cut inside it decodes to
    U+FFFD, which is dropped unless ``text`` itself carries that character.
    """
    if max_tokens <= 0:
        return ""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    cut = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    assert isinstance(cut, str), "a flat list of ids decodes to one string"
    return cut if _REPLACEMENT_CHAR in text else cut.rstrip(_REPLACEMENT_CHAR)
