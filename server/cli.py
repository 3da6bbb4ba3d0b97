"""The ``hubserve`` command: ``serve`` (and ``demo``) here, the sync commands from sync/cli.py."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from server.batch.cli import batches_cmd
from server.keys_cli import keys_app
from sync.cli import (
    ConfigOpt,
    InsecurePublicOpt,
    StoreOpt,
    VerboseOpt,
    check_bind,
    cli_errors,
    expand_optional_values,
    register_sync_commands,
)

app = typer.Typer(
    name="hubserve",
    help="Serve pinned Hugging Face models from a verified local store.",
    epilog="Example: hubserve sync --config models.toml && hubserve serve --config models.toml --port 8080",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
register_sync_commands(app)
app.add_typer(keys_app)
app.command("batches")(batches_cmd)

# ---- serve (server side) ---------------------------------------------------------------------------------


HostOpt = Annotated[
    str | None, typer.Option("--host", help="Address to listen on (default: $HUBSERVE_HOST, else 127.0.0.1).")
]
PortOpt = Annotated[
    int | None, typer.Option("--port", "-p", help="Port to listen on (default: $HUBSERVE_PORT, else 8080).")
]


@app.command("serve")
@cli_errors
def serve_cmd(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    wait_for_sync: Annotated[
        bool | None,
        typer.Option(
            "--wait-for-sync/--no-wait-for-sync",
            help="Start even if some models are not synced yet and serve each once it is "
            "(with `hubserve daemon`; default: $HUBSERVE_WAIT_FOR_SYNC, else off).",
            show_default=False,
        ),
    ] = None,
    insecure_public: InsecurePublicOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Serve every model of models.toml from the store: OpenAI, TGI and Hub Inference API routes.

    Each model runs in its own supervised vLLM process, started offline from its verified revision.
    API keys: `hubserve keys add` (named, per-model, rate-limited; picked up while running), or
    $HUBSERVE_API_KEYS (comma-separated) / $HUBSERVE_API_KEYS_FILE (sha256 digests).

    While it runs it follows models.toml, models.lock and the store (file events, SIGHUP, POST /admin/reload):
    a new verified revision is swapped in without failing a request, added models load, removed ones unload.

    Example: HUBSERVE_API_KEYS=secret hubserve serve --config models.toml --port 8080
    """
    import uvicorn
    from pydantic import ValidationError

    from server.app import build_registry, create_app
    from server.ops.keys import read_keys
    from server.ops.logs import configure_logging
    from server.settings import Settings
    from sync.errors import ConfigError

    given = {"config": config, "store": store, "host": host, "port": port, "wait_for_sync": wait_for_sync}
    try:
        settings = Settings.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        where = "HUBSERVE_" + "_".join(str(p) for p in first["loc"]).upper()
        raise ConfigError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
    has_keys = bool(settings.all_key_digests()) or settings.keys_path().is_file()
    check_bind(settings.host, has_keys, insecure_public, "add one with `hubserve keys add NAME`")
    read_keys(settings.keys_path())  # a malformed keys file fails here, named, not at the first request
    configure_logging(settings.log_format, "debug" if verbose else settings.log_level)
    registry = build_registry(settings)
    try:
        uvicorn.run(
            create_app(settings, registry),
            host=settings.host,
            port=settings.port,
            log_config=None,
            log_level="debug" if verbose else settings.log_level,
            timeout_graceful_shutdown=5,
        )
    finally:
        for engine in registry.engines.values():  # normally stopped by the lifespan already
            kill_now = getattr(engine, "kill_now", None)
            if callable(kill_now):
                kill_now()


def main() -> None:
    app(args=expand_optional_values(sys.argv[1:]), prog_name="hubserve")


if __name__ == "__main__":
    main()
