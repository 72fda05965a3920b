"""The Typer apps every command module attaches to, and the options several commands share.

Kept import-light: no torch here.
"""

from typing import Annotated

import typer

app = typer.Typer(
    name="tspo",
    help="Train LLM search agents with TSPO (turn-level stage-aware policy optimization).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Build datasets: the bundled Wikipedia QA and the synthetic world.")
index_app = typer.Typer(help="Build retrieval indexes (BM25 or dense).")
app.add_typer(data_app, name="data", no_args_is_help=True)
app.add_typer(index_app, name="index", no_args_is_help=True)

# Options several commands share, declared once.
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads", help="torch CPU threads (default: $TSPO_THREADS, else the free cores)."
    ),
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace OUT when it already holds files.")
]


def _print_version(value: bool) -> None:
    if value:
        from tspo import __version__

        typer.echo(f"tspo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Train LLM search agents with TSPO (turn-level stage-aware policy optimization)."""
