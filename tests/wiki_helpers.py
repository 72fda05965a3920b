"""A miniature of `tspo data wiki`: six articles, single-hop and bridge questions, a micro Llama."""

from __future__ import annotations

from pathlib import Path

from train_helpers import single_thread, write_jsonl

from tspo.data.qa import QAExample
from tspo.protocol import PROMPT_TEMPLATE

ARTICLES = [
    ("Paris", "Paris is the capital and largest city of France, on the Seine."),
    ("France", "France is a country in Western Europe whose capital is Paris."),
    ("Nile", "The Nile is a major north-flowing river in northeastern Africa."),
    ("Egypt", "Egypt is a country in North Africa; the Nile crosses Egypt from south to north."),
    ("Oslo", "Oslo is the capital and most populous city of Norway."),
    ("Andes", "The Andes are the longest continental mountain range in the world."),
]
SINGLE = [
    ("What is the capital and largest city of France?", ["Paris"], "Paris"),
    ("What is the capital and most populous city of Norway?", ["oslo"], "Oslo"),
    ("What is a major north-flowing river in northeastern Africa?", ["Nile"], "Nile"),
    ("What is a lost island that nobody ever described?", ["Atlantis"], "Atlantis"),
]
BRIDGE = [
    ("Which country in North Africa has a summary that mentions a major north-flowing river in "
     "northeastern Africa?", ["Egypt"], "Egypt", "Nile"),
    ("Which city has a summary that mentions a fictional ocean of liquid silver?", ["Paris"],
     "Paris", "Seine"),
]  # fmt: skip


def wiki_examples() -> list[QAExample]:
    examples = [
        QAExample(f"wiki-single-{i}", q, golds, "wiki_single", {"kind": "single", "title": title})
        for i, (q, golds, title) in enumerate(SINGLE)
    ]
    examples += [
        QAExample(
            f"wiki-bridge-{i}",
            q,
            golds,
            "wiki_bridge",
            {"kind": "bridge", "title": title, "bridge": bridge},
        )
        for i, (q, golds, title, bridge) in enumerate(BRIDGE)
    ]
    return examples


def build_wiki_folder(folder: Path) -> Path:
    """``corpus.jsonl``, ``train/dev/test.jsonl`` (all the same questions) in the `tspo data wiki`
    layout, and a random-weight micro Llama with its tokenizer in ``folder/model``."""
    from tspo.data.qa import write_flashrag_jsonl
    from tspo.models.tiny import build_tiny_model, train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        folder / "corpus.jsonl",
        [{"id": str(i), "contents": f"{t}\n{x}"} for i, (t, x) in enumerate(ARTICLES)],
    )
    for split in ("train", "dev", "test"):
        write_flashrag_jsonl(wiki_examples(), folder / f"{split}.jsonl")
    texts = [f"{t}\n{x}" for t, x in ARTICLES]
    texts += [PROMPT_TEMPLATE.format(question=q) for q, *_ in SINGLE]
    texts += ["<think> Doc 1 answers the question. </think>", "<search> </search> <answer>"]
    tokenizer = train_tokenizer(texts * 4, vocab_size=400, min_frequency=1)
    with single_thread():
        model = build_tiny_model(tokenizer, "micro", seed=0)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder
