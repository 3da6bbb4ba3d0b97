"""The ``hubserve`` command: ``serve`` (and ``demo``) here, the sync commands from sync/cli.py."""

from __future__ import annotations

import typer

from sync.cli import register_sync_commands

app = typer.Typer(
    name="hubserve",
    help="Serve pinned Hugging Face models from a verified local store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
register_sync_commands(app)

# ---- serve (server side) ---------------------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
