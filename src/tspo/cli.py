"""`tspo <command>`: the one entry point. Each area registers its commands on `tspo.cli_apps`.

Command modules import heavy libraries (torch, transformers) inside the command functions, so
``tspo --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

from tspo.cli_apps import app
from tspo.errors import TSPOError

COMMAND_MODULES = (
    "tspo.data.commands",
    "tspo.retrieval.commands",
    "tspo.train.commands",
    "tspo.quickstart.commands",
    "tspo.pretrain.commands",
)

for _module in COMMAND_MODULES:
    importlib.import_module(_module)


def main() -> None:
    """Run the CLI; a user-caused error prints one line and exits with status 2."""
    try:
        app()
    except TSPOError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
