"""The ``cmw-vllm`` command line: parse, call the core, render, map errors to exit codes.

Core modules never print; every error they raise is a :class:`CmwVllmError` that
:func:`main` turns into one line on stderr and the error's exit code (tracebacks only
with ``-v``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from cmw_vllm import (
    __version__,
    cli_inference,
    cli_lifecycle,
    cli_machine,
    cli_models,
    cli_registry,
)
from cmw_vllm.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, CmwVllmError

logger = logging.getLogger("cmw_vllm")

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class CmwGroup(click.Group):
    """The top-level group: maps package errors to one line and an exit code.

    Overriding ``main`` (rather than wrapping it) makes click's test runner take the same
    path as the console script.
    """

    def main(self, args: Any = None, prog_name: str | None = None, *a: Any, **kw: Any) -> Any:
        """Run the CLI; never let a CmwVllmError escape as a traceback."""
        kw["standalone_mode"] = False
        argv = list(args) if args is not None else sys.argv[1:]
        verbose = bool(argv) and argv[0] in ("-v", "--verbose")
        try:
            rc = super().main(argv, prog_name or "cmw-vllm", *a, **kw)
        except CmwVllmError as exc:
            if verbose:
                logger.exception("error")
            log_tail = getattr(exc, "log_tail", "")
            if log_tail:
                click.echo("--- last lines of the log ---", err=True)
                click.echo(log_tail, err=True)
                click.echo("---", err=True)
            click.echo(f"Error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"Hint: {exc.hint}", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("Interrupted.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code if exc.exit_code is not None else EXIT_USAGE)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            sys.exit(EXIT_FAILURE)
        except Exception as exc:  # last resort: one line, traceback only with -v
            if verbose:
                raise
            click.echo(
                f"Error: unexpected {type(exc).__name__}: {exc} (run with -v for details)",
                err=True,
            )
            sys.exit(EXIT_FAILURE)
        sys.exit(rc if isinstance(rc, int) else 0)


@click.group(cls=CmwGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="cmw-vllm")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Run and look after vLLM inference servers.

    \b
    Examples:
      cmw-vllm start qwen               # registry alias -> tuned vLLM server
      cmw-vllm start ./my-model --port 8001 -- --enforce-eager
      cmw-vllm status --json            # exit 0 when every server is healthy
      cmw-vllm logs qwen -f
      cmw-vllm stop --all
    """
    from cmw_vllm.logging import setup_logging
    from cmw_vllm.settings import load_env_file

    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    load_env_file()
    setup_logging(verbose)


for _module in (cli_lifecycle, cli_registry, cli_models, cli_machine, cli_inference):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(argv)
