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

from cmw_vllm import __version__
from cmw_vllm.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, CmwVllmError

logger = logging.getLogger("cmw_vllm")

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# Command name -> the module that defines it. Only the invoked command's module is
# imported, which keeps `status` and `--version` fast; `--help` imports them all.
LAZY_COMMANDS = {
    "start": "cli_lifecycle",
    "stop": "cli_lifecycle",
    "restart": "cli_lifecycle",
    "status": "cli_status",
    "logs": "cli_lifecycle",
    "enable": "cli_service",
    "disable": "cli_service",
    "list": "cli_registry",
    "download": "cli_models",
    "verify": "cli_models",
    "gpus": "cli_machine",
    "disk": "cli_machine",
    "setup": "cli_machine",
    "estimate": "cli_machine",
    "test": "cli_inference",
    "gateway": "cli_gateway",
    "ray": "cli_multinode",
    "export": "cli_export",
}


class CmwGroup(click.Group):
    """The top-level group: loads commands lazily, maps package errors to exit codes.

    Overriding ``main`` (rather than wrapping it) makes click's test runner take the same
    path as the console script.
    """

    last_meta: dict[str, Any] = {}  # noqa: RUF012 - replaced, never changed in place

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command, in the order they are listed in ``--help``."""
        return list(LAZY_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import the module of ``cmd_name`` on first use."""
        module_name = LAZY_COMMANDS.get(cmd_name)
        if module_name is not None and cmd_name not in self.commands:
            import importlib

            module = importlib.import_module(f"cmw_vllm.{module_name}")
            for command in module.COMMANDS:
                self.add_command(command)
        return self.commands.get(cmd_name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        """Suggest close names from every command, loaded or not."""
        name = args[0]
        if name not in LAZY_COMMANDS and not name.startswith("-") and not ctx.resilient_parsing:
            raise click.exceptions.NoSuchCommand(name, possibilities=list(LAZY_COMMANDS), ctx=ctx)
        return super().resolve_command(ctx, args)

    def wants_json(self, argv: list[str]) -> bool:
        """Whether ``argv`` runs a command that has ``--json`` with ``--json`` given.

        The command line is parsed again leniently (an option's value that reads
        ``--json`` is no request for JSON); a command line that does not parse has
        ``--json`` when it is among the command's arguments before ``--``.
        """
        ctx = click.Context(self, info_name="cmw-vllm", resilient_parsing=True)
        rest = [a for a in argv if a not in ("-v", "--verbose")]
        command: click.Command | None = self
        while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
            try:
                command = command.get_command(ctx, rest[0])
            except Exception:  # an unimportable module: no JSON to promise
                return False
            info_name, rest = rest[0], rest[1:]
        if command is None or isinstance(command, click.Group):
            return False
        flag = next((p for p in command.params
                     if isinstance(p, click.Option) and "--json" in p.opts), None)
        if flag is None or flag.name is None:
            return False
        try:
            parsed = command.make_context(info_name, list(rest), parent=ctx,
                                          resilient_parsing=True)
            return bool(parsed.params.get(flag.name))
        except Exception:
            return "--json" in (rest[:rest.index("--")] if "--" in rest else rest)

    def fail(self, message: str, code: int, hint: str | None, as_json: bool) -> None:
        """Exit with ``code``; with ``--json``, first say why as one object on stdout.

        The object is ``{"error", "hint", "exit_code"}``; it is left out when the command
        already printed its own object (``test`` prints its failure with the same keys).
        """
        if as_json:
            from cmw_vllm.cli_common import JSON_PRINTED, echo_json

            if not self.last_meta.get(JSON_PRINTED):
                echo_json({"error": message, "hint": hint, "exit_code": code})
        sys.exit(code)

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        """The root context; its ``meta`` (shared with the command's) outlives a failure."""
        ctx = super().make_context(info_name, args, parent, **extra)
        self.last_meta = ctx.meta
        return ctx

    def main(self, args: Any = None, prog_name: str | None = None, *a: Any, **kw: Any) -> Any:
        """Run the CLI; never let a CmwVllmError escape as a traceback.

        With ``--json``, a failure also prints ``{"error", "hint", "exit_code"}`` on stdout
        (the line on stderr stays).
        """
        kw["standalone_mode"] = False
        self.last_meta = {}
        argv = list(args) if args is not None else sys.argv[1:]
        verbose = bool(argv) and argv[0] in ("-v", "--verbose")
        try:
            try:
                rc = super().main(argv, prog_name or "cmw-vllm", *a, **kw)
            except click.exceptions.Exit:
                raise
            except (Exception, click.exceptions.Abort, KeyboardInterrupt) as exc:
                exc.cmw_json = self.wants_json(argv)  # type: ignore[union-attr]
                raise
        except CmwVllmError as exc:
            if verbose:
                logger.exception("error")
            body = getattr(exc, "body", None)
            if verbose and body:
                click.echo("--- the server's answer ---", err=True)
                click.echo(body.rstrip("\n"), err=True)
                click.echo("---", err=True)
            log_tail = getattr(exc, "log_tail", "")
            if log_tail:
                click.echo("--- from the log ---", err=True)
                click.echo(log_tail, err=True)
                click.echo("---", err=True)
            click.echo(f"Error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"Hint: {exc.hint}", err=True)
            self.fail(exc.message, exc.exit_code, exc.hint, _json_asked(exc))
        except (click.exceptions.Abort, KeyboardInterrupt) as exc:
            click.echo("Interrupted.", err=True)
            self.fail("interrupted", EXIT_INTERRUPTED, None, _json_asked(exc))
        except click.ClickException as exc:
            if isinstance(exc, click.NoSuchOption) and exc.possibilities:
                # A look-alike is a guess; --force turns a safety check off, so never guess it.
                exc.possibilities = [p for p in exc.possibilities if p != "--force"]
            exc.show()
            self.fail(exc.format_message(),
                      exc.exit_code if exc.exit_code is not None else EXIT_USAGE, None,
                      _json_asked(exc))
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            sys.exit(EXIT_FAILURE)
        except Exception as exc:  # last resort: one line, traceback only with -v
            if verbose:
                raise
            message = f"unexpected {type(exc).__name__}: {exc}"
            click.echo(f"Error: {message} (run with -v for details)", err=True)
            self.fail(message, EXIT_FAILURE, None, _json_asked(exc))
        sys.exit(rc if isinstance(rc, int) else 0)


def _json_asked(exc: BaseException) -> bool:
    """Whether the command that raised ``exc`` was given ``--json`` (see ``wants_json``)."""
    return bool(getattr(exc, "cmw_json", False))


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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(argv)
