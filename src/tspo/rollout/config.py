"""`RolloutConfig`: every knob of a multi-turn rollout (the protocol: docs/algorithm.md §1).

The trainer's ``rollout`` and ``algo`` config sections carry the same defaults (the config must
validate without torch); ``RolloutSection.to_rollout_config`` builds a ``RolloutConfig`` from them
by field name, and a test (tests/test_settings_agree.py) fails when the copies drift."""

from __future__ import annotations

from dataclasses import dataclass

from tspo.algo.folr import DEFAULT_DETECT_IN, DEFAULT_MIN_ANSWER_CHARS, DETECT_IN
from tspo.errors import TSPOError


@dataclass
class RolloutConfig:
    """How the engine generates, talks to the retriever, and scores.

    ``max_turns`` turns may search; then every unfinished rollout gets one more turn in which a
    search is not executed (the forced answer turn). ``kv_cache=False`` selects the reference path
    that re-encodes each rollout's whole context at the start of every turn.
    """

    max_turns: int = 4
    max_turn_tokens: int = 500  # generated tokens per turn
    max_obs_tokens: int = 500  # tokens of retrieved text per observation
    topk: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    use_chat_template: bool = False
    kv_cache: bool = True
    detect_in: str = DEFAULT_DETECT_IN  # where FOLR looks for the first gold occurrence
    min_answer_chars: int = DEFAULT_MIN_ANSWER_CHARS

    def __post_init__(self) -> None:
        checks = [
            ("max_turns", self.max_turns >= 0, "must be >= 0"),
            ("max_turn_tokens", self.max_turn_tokens >= 1, "must be >= 1"),
            ("max_obs_tokens", self.max_obs_tokens >= 0, "must be >= 0"),
            ("topk", self.topk >= 1, "must be >= 1"),
            ("temperature", self.temperature > 0, "must be > 0 (use greedy=True for argmax)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("detect_in", self.detect_in in DETECT_IN, f"must be one of {', '.join(DETECT_IN)}"),
            ("min_answer_chars", self.min_answer_chars >= 0, "must be >= 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise TSPOError(f"rollout.{name} {rule}, got {getattr(self, name)!r}")
