"""glmctl's command line: parse options, call a stage, map errors to exit codes.

Each stage's command lives in ``glmctl/commands/<stage>.py`` as ``register(app)``; the stages
themselves (``glmctl.stages.*``) know nothing of typer. Options resolve as
flag > ``GLMCTL_<COMMAND>_<OPTION>`` environment variable > ``--config`` YAML > default.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from glmctl import __version__, artifacts
from glmctl.errors import EXIT_CODES_HELP, EXIT_FAILURE, EXIT_USAGE, GlmctlError

app = typer.Typer(
    name="glmctl",
    help="GLM-130B-style language models from the command line.\n\n"
         "Pipeline: tokenizer train -> tokenize -> pretrain -> convert -> quantize -> evaluate -> generate. "
         "Every stage reads and writes artifact directories with a manifest.json.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"auto_envvar_prefix": "GLMCTL", "help_option_names": ["-h", "--help"]},
)

# Pipeline order: this is the order `glmctl --help` lists them in.
COMMAND_MODULES = ["tokenize", "pretrain", "convert", "quantize", "finetune", "evaluate", "generate", "serve", "report",
                   "inspect", "kernels"]


def _version(value: bool):
    if value:
        typer.echo(f"glmctl {__version__}")
        raise typer.Exit()


def _load_config_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise GlmctlError(f"{path}: no such config file", EXIT_USAGE) from None
    except yaml.YAMLError as e:
        raise GlmctlError(f"{path}: malformed YAML ({str(e).splitlines()[0]})", EXIT_USAGE) from None
    if not isinstance(data, dict):
        raise GlmctlError(f"{path}: expected a mapping of option names to values", EXIT_USAGE)
    return data


@app.callback()
def root(
    ctx: typer.Context,
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
    config: Optional[Path] = typer.Option(None, "--config", envvar="GLMCTL_CONFIG",
                                          help="YAML file of option defaults: `{option: value}` for the "
                                               "command being run, or `{command: {option: value}}`."),
):
    if config is not None:
        data = _load_config_file(config)
        sub = ctx.invoked_subcommand
        names = {c for c in (ctx.command.commands if hasattr(ctx.command, "commands") else {})}
        if any(k in names for k in data):  # nested form {command: {option: value}}
            default_map = {k: {kk.replace("-", "_"): vv for kk, vv in v.items()} for k, v in data.items()
                           if isinstance(v, dict)}
        else:
            default_map = {sub: {k.replace("-", "_"): v for k, v in data.items()}}
        ctx.default_map = default_map


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"glmctl.commands.{name}").register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected failures print one line and exit with their code."""
    artifacts.RUN_STARTED = _dt.datetime.now(_dt.timezone.utc)
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # `glmctl` alone: the stages in pipeline order, on stdout
        argv = ["--help"]
    try:
        app(args=argv, standalone_mode=False, prog_name="glmctl")
    except GlmctlError as e:
        print(f"glmctl: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("glmctl: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("glmctl: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - usage errors of click / typer's vendored click
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Exit" and hasattr(e, "exit_code"):
            sys.exit(e.exit_code)
        if os.environ.get("GLMCTL_DEBUG"):
            raise
        print(f"glmctl: internal error: {type(e).__name__}: {e} (set GLMCTL_DEBUG=1 for a traceback)",
              file=sys.stderr)
        sys.exit(EXIT_FAILURE)
    sys.exit(0)


if __name__ == "__main__":
    main()
