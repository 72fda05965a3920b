"""`tspo <command>`: the one entry point. Each area registers its commands on `tspo.cli_apps`.

Command modules import heavy libraries (torch, transformers) inside the command functions, so
``tspo --help`` stays fast. Every user mistake (a bad flag, file or value) ends as one line
``error: …`` on stderr and exit status 2, with the closest valid flag or config field when there
is one; Ctrl-C ends with status 130.
"""

from __future__ import annotations

import difflib
import importlib
import sys

import typer

try:  # recent typer vendors click as typer._click; earlier versions use click itself
    from typer._click import exceptions as clickx
except ImportError:  # pragma: no cover
    from click import exceptions as clickx  # type: ignore[no-redef]

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

# Commands whose settings are config fields (section.field=value) rather than flags.
CONFIG_COMMANDS = ("train",)


def _flag_value(args: list[str], flag: str) -> str:
    """The value written after ``flag`` (``--steps 1`` or ``--steps=1``), else ``VALUE``."""
    for index, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
        if arg == flag and index + 1 < len(args) and not args[index + 1].startswith("-"):
            return args[index + 1]
    return "VALUE"


def usage_message(err: clickx.UsageError, args: list[str]) -> str:
    """One plain line for a click usage error, with the closest flag, command or config field."""
    ctx = err.ctx
    where = f"{ctx.command_path}: " if ctx is not None else ""
    if isinstance(err, clickx.NoSuchOption):
        flag = err.option_name
        if ctx is not None and ctx.info_name in CONFIG_COMMANDS:
            from tspo.train.config import suggest_field

            field = suggest_field(flag.lstrip("-").replace("-", "_"))
            if field:
                value = _flag_value(args, flag)
                return (
                    f"{where}no option {flag}; config fields are set as section.field=value: "
                    f"did you mean {field}={value}?"
                )
        flags = sorted(err.possibilities or ())
        if ctx is not None:
            flags = [name for param in ctx.command.params for name in param.opts]
        close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.7)
        see_help = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        hint = f"; did you mean {close[0]}?" if close else see_help
        return f"{where}no option {flag}{hint}"
    message = " ".join(err.format_message().split()).rstrip(".")
    if ctx is not None and hasattr(ctx.command, "list_commands") and message.startswith("No such"):
        name = message.split("'")[1] if "'" in message else ""
        close = difflib.get_close_matches(name, ctx.command.list_commands(ctx), n=1)
        if close:
            return f"{where}no command {name!r}; did you mean {close[0]}?"
    message = message[:1].lower() + message[1:]
    return f"{where}{message}" + (f" (see {ctx.command_path} --help)" if ctx is not None else "")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a user-caused error prints one line and exits with status 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = app(args=args, prog_name="tspo", standalone_mode=False)
    except clickx.NoArgsIsHelpError as err:
        err.show()  # the help text, as click prints it
        sys.exit(err.exit_code)
    except clickx.UsageError as err:
        print(f"error: {usage_message(err, args)}", file=sys.stderr)
        sys.exit(2)
    except clickx.ClickException as err:
        print(f"error: {' '.join(err.format_message().split())}", file=sys.stderr)
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except TSPOError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
