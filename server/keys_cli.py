"""``hubserve keys add|list|revoke``: named API keys in the keys file a running server follows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from sync.cli import ConfigOpt, VerboseOpt, cli_errors, err, out
from sync.errors import ConfigError

keys_app = typer.Typer(
    name="keys",
    help="Named API keys (salted hashes in keys.toml beside models.toml); a running server picks changes up. "
    "Example: hubserve keys add team-search --models smollm2 --rpm 60",
    no_args_is_help=True,
)

KeysFileOpt = Annotated[
    Path | None,
    typer.Option("--keys-file", help="Keys file (default: $HUBSERVE_KEYS_FILE, else keys.toml beside models.toml)."),
]


def keys_path(config: Path | None, keys_file: Path | None) -> Path:
    if keys_file is not None:
        return keys_file
    if os.environ.get("HUBSERVE_KEYS_FILE"):
        return Path(os.environ["HUBSERVE_KEYS_FILE"])
    config = config or (Path(os.environ["HUBSERVE_CONFIG"]) if os.environ.get("HUBSERVE_CONFIG") else None)
    return (config or Path("models.toml")).absolute().parent / "keys.toml"


@keys_app.command("add")
@cli_errors
def add_cmd(
    name: Annotated[str, typer.Argument(help="Who the key is for; shown in logs and metrics.")],
    models: Annotated[
        str | None, typer.Option("--models", help="Comma-separated served names or repo ids (default: all).")
    ] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute (default: no limit).")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", min=1, help="Tokens per minute (default: no limit).")] = None,
    config: ConfigOpt = None,
    keys_file: KeysFileOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Create a key and print it once (only its salted hash is stored).

    Example: hubserve keys add team-search --models smollm2 --rpm 60 --tpm 20000
    """
    from server.ops.keys import KeyRecord, new_key, update_keys

    path = keys_path(config, keys_file)
    allowed = tuple(m.strip() for m in models.split(",") if m.strip()) if models is not None else None
    key, record = new_key(name, allowed, rpm, tpm)

    def add(records: dict[str, KeyRecord]) -> dict[str, KeyRecord]:
        if any(r.name == name for r in records.values()):
            raise ConfigError(f"{path}: a key named {name!r} exists; revoke it first or choose another name")
        return {**records, record.id: record}

    update_keys(path, add)  # read, change, write under the file's lock: concurrent commands lose nothing
    err.print(f"key {name!r} added to {path}; it is shown only now:")
    print(key)


@keys_app.command("list")
@cli_errors
def list_cmd(config: ConfigOpt = None, keys_file: KeysFileOpt = None, verbose: VerboseOpt = False) -> None:
    """Show each key's name, id, models and limits (never the key).

    Example: hubserve keys list --config models.toml
    """
    from rich.table import Table

    from server.ops.keys import read_keys

    path = keys_path(config, keys_file)
    table = Table("name", "id", "models", "rpm", "tpm", "created", title=str(path))
    for r in read_keys(path).values():
        models = ",".join(r.models) if r.models is not None else "*"
        table.add_row(r.name, r.id, models, str(r.rpm or "-"), str(r.tpm or "-"), r.created)
    out.print(table)


@keys_app.command("revoke")
@cli_errors
def revoke_cmd(
    name: Annotated[str, typer.Argument(help="Name of the key to revoke.")],
    config: ConfigOpt = None,
    keys_file: KeysFileOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Delete a key; a running server refuses it from its next request on.

    Example: hubserve keys revoke team-search
    """
    from server.ops.keys import KeyRecord, update_keys

    path = keys_path(config, keys_file)

    def revoke(records: dict[str, KeyRecord]) -> dict[str, KeyRecord]:
        kept = {i: r for i, r in records.items() if r.name != name}
        if len(kept) == len(records):
            raise ConfigError(f"{path}: no key named {name!r} (see `hubserve keys list`)")
        return kept

    update_keys(path, revoke)
    err.print(f"key {name!r} revoked in {path}")
