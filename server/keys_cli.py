"""``hubserve keys add|update|list|revoke|usage``: named API keys in the keys file a running server follows, and
what each key used (from the shared state)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sync.cli import ConfigOpt, VerboseOpt, cli_errors, err, out
from sync.errors import ConfigError

if TYPE_CHECKING:
    from server.ops.keys import KeyRecord

keys_app = typer.Typer(
    name="keys",
    help="Named API keys (salted hashes in keys.toml beside models.toml); a running server picks changes up. "
    "Example: hubserve keys add team-search --models smollm2 --rpm 60 --daily-tokens 1000000 --expires 30d",
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


def _int_opt(flag: str, what: str) -> Any:
    return typer.Option(flag, min=1, help=f"{what} (default: no limit).")


DailyOpt = Annotated[int | None, _int_opt("--daily-tokens", "Tokens (in + out) per UTC day")]
MonthlyOpt = Annotated[int | None, _int_opt("--monthly-tokens", "Tokens (in + out) per UTC calendar month")]
ConcurrentOpt = Annotated[int | None, _int_opt("--max-concurrent", "Requests in flight at once, over all gateways")]
InputOpt = Annotated[int | None, _int_opt("--max-input-tokens", "Input (prompt) tokens of one request")]
ExpiresOpt = Annotated[
    str | None, typer.Option("--expires", help="30d, 12h, 90m from now, or an ISO date/time in UTC (default: never).")
]
ScopesOpt = Annotated[
    str | None, typer.Option("--scopes", help="Comma-separated: inference,batch,mirror,admin "
                             "(default: inference,batch).")
]
RpmOpt = Annotated[int | None, _int_opt("--rpm", "Requests per minute")]
TpmOpt = Annotated[int | None, _int_opt("--tpm", "Tokens per minute")]
ModelsOpt = Annotated[
    str | None, typer.Option("--models", help="Comma-separated served names or repo ids (default: all).")
]


def _models(models: str | None) -> tuple[str, ...] | None:
    return tuple(m.strip() for m in models.split(",") if m.strip()) if models is not None else None


@keys_app.command("add")
@cli_errors
def add_cmd(
    name: Annotated[str, typer.Argument(help="Who the key is for; shown in logs and metrics.")],
    models: ModelsOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    daily_tokens: DailyOpt = None,
    monthly_tokens: MonthlyOpt = None,
    max_concurrent: ConcurrentOpt = None,
    max_input_tokens: InputOpt = None,
    expires: ExpiresOpt = None,
    scopes: ScopesOpt = None,
    config: ConfigOpt = None,
    keys_file: KeysFileOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Create a key and print it once (only its salted hash is stored).

    Example: hubserve keys add team-search --models smollm2 --rpm 60 --tpm 20000 --daily-tokens 1000000
    --max-concurrent 4 --expires 30d --scopes inference,batch
    """
    from server.ops.keys import DEFAULT_SCOPES, new_key, parse_expires, parse_scopes, update_keys

    path = keys_path(config, keys_file)
    key, record = new_key(
        name, _models(models), rpm, tpm, daily_tokens=daily_tokens, monthly_tokens=monthly_tokens,
        max_concurrent=max_concurrent, max_input_tokens=max_input_tokens,
        expires=parse_expires(expires) if expires is not None else None,
        scopes=parse_scopes(scopes) if scopes is not None else DEFAULT_SCOPES,
    )

    def add(records: dict[str, KeyRecord]) -> dict[str, KeyRecord]:
        if any(r.name == name for r in records.values()):
            raise ConfigError(f"{path}: a key named {name!r} exists; revoke it first or choose another name")
        return {**records, record.id: record}

    update_keys(path, add)  # read, change, write under the file's lock: concurrent commands lose nothing
    err.print(f"key {name!r} added to {path}; it is shown only now:")
    print(key)


CLEARABLE = ("models", "rpm", "tpm", "daily_tokens", "monthly_tokens", "max_concurrent", "max_input_tokens")


@keys_app.command("update")
@cli_errors
def update_cmd(
    name: Annotated[str, typer.Argument(help="Name of the key to change; the key itself stays valid.")],
    models: ModelsOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    daily_tokens: DailyOpt = None,
    monthly_tokens: MonthlyOpt = None,
    max_concurrent: ConcurrentOpt = None,
    max_input_tokens: InputOpt = None,
    expires: ExpiresOpt = None,
    scopes: ScopesOpt = None,
    clear: Annotated[
        list[str] | None, typer.Option("--clear", help=f"Remove a limit (repeatable): {', '.join(CLEARABLE)} "
                                       "(models: every model again).")
    ] = None,
    no_expiry: Annotated[bool, typer.Option("--no-expiry", help="The key never expires.")] = False,
    config: ConfigOpt = None,
    keys_file: KeysFileOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Change a key's models, limits, expiry or scopes in place; a running server applies it on the next request.

    Example: hubserve keys update team-search --daily-tokens 2000000 --clear rpm --no-expiry
    """
    from server.ops.keys import parse_expires, parse_scopes, update_keys, with_changes

    path = keys_path(config, keys_file)
    changes: dict[str, Any] = {k: v for k, v in (
        ("models", _models(models)), ("rpm", rpm), ("tpm", tpm), ("daily_tokens", daily_tokens),
        ("monthly_tokens", monthly_tokens), ("max_concurrent", max_concurrent),
        ("max_input_tokens", max_input_tokens)) if v is not None}
    for field in (f.replace("-", "_") for f in clear or []):
        if field not in CLEARABLE:
            raise ConfigError(f"--clear {field}: one of {', '.join(CLEARABLE)}")
        if field in changes:
            raise ConfigError(f"--clear {field} and a new value for it: choose one")
        changes[field] = None
    if expires is not None and no_expiry:
        raise ConfigError("--expires and --no-expiry: choose one")
    if expires is not None or no_expiry:
        changes["expires"] = parse_expires(expires) if expires is not None else None
    if scopes is not None:
        changes["scopes"] = parse_scopes(scopes)
    if not changes:
        raise ConfigError("nothing to change; see `hubserve keys update --help`")

    def update(records: dict[str, KeyRecord]) -> dict[str, KeyRecord]:
        found = [r for r in records.values() if r.name == name]
        if not found:
            raise ConfigError(f"{path}: no key named {name!r} (see `hubserve keys list`)")
        return {i: with_changes(r, **changes) if r.name == name else r for i, r in records.items()}

    update_keys(path, update)
    err.print(f"key {name!r} updated in {path}: {', '.join(sorted(changes))}")


@keys_app.command("list")
@cli_errors
def list_cmd(config: ConfigOpt = None, keys_file: KeysFileOpt = None, verbose: VerboseOpt = False) -> None:
    """Show each key's name, id, models, limits, expiry and scopes (never the key).

    Example: hubserve keys list --config models.toml
    """
    from rich.table import Table

    from server.ops.keys import read_keys

    path = keys_path(config, keys_file)
    table = Table("name", "id", "models", "rpm", "tpm", "daily", "monthly", "concurrent", "input", "expires",
                  "scopes", "created", title=str(path))
    for r in read_keys(path).values():
        models = ",".join(r.models) if r.models is not None else "*"
        limits = (r.rpm, r.tpm, r.daily_tokens, r.monthly_tokens, r.max_concurrent, r.max_input_tokens)
        expires = (r.expires or "never") + (" (expired)" if r.expired() else "")
        table.add_row(r.name, r.id, models, *(str(v or "-") for v in limits), expires, ",".join(r.scopes), r.created)
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
    from server.ops.keys import update_keys

    path = keys_path(config, keys_file)

    def revoke(records: dict[str, KeyRecord]) -> dict[str, KeyRecord]:
        kept = {i: r for i, r in records.items() if r.name != name}
        if len(kept) == len(records):
            raise ConfigError(f"{path}: no key named {name!r} (see `hubserve keys list`)")
        return kept

    update_keys(path, revoke)
    err.print(f"key {name!r} revoked in {path}")


@keys_app.command("usage")
@cli_errors
def usage_cmd(
    name: Annotated[str | None, typer.Argument(help="One key (default: every key with usage).")] = None,
    days: Annotated[int, typer.Option("--days", min=1, max=3660, help="Days to show, today included.")] = 7,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
    state_url: Annotated[
        str | None, typer.Option("--state-url", envvar="HUBSERVE_STATE_URL", show_envvar=True,
                                 help="The gateways' shared state (default: state.db beside the keys file).")
    ] = None,
    config: ConfigOpt = None,
    keys_file: KeysFileOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Tokens in/out and requests per key per UTC day, and this month's tokens against the monthly budget.

    Example: hubserve keys usage team-search --days 30 --json
    """
    from server.ops.keys import read_keys

    path = keys_path(config, keys_file)
    records = {r.name: r for r in read_keys(path).values()}
    report = asyncio.run(_usage_report(state_url, path.parent / "state.db", name, days, records))
    if as_json:
        print(json.dumps({"keys": report}, indent=2))
        return
    _print_usage(report)


async def _usage_report(
    url: str | None, default: Path, name: str | None, days: int, records: dict[str, KeyRecord]
) -> list[dict[str, Any]]:
    import datetime as dt

    from server.ops.budgets import month_window
    from server.ops.usage import key_names, usage_of
    from server.state import open_state

    if not url and not default.is_file():
        names: list[str] = [name] if name else []
        return [_key_report(n, [], [], records.get(n), month_window(dt.datetime.now(dt.UTC))[0]) for n in names]
    store = open_state(url, default)
    try:
        now = dt.datetime.now(dt.UTC)
        month = month_window(now)[0]
        since = min((now - dt.timedelta(days=days - 1)).date(), now.date().replace(day=1)).isoformat()
        names = [name] if name else await key_names(store)
        out = []
        for n in names:
            rows = await usage_of(store, n, since)
            shown = [r for r in rows if r.day >= (now - dt.timedelta(days=days - 1)).date().isoformat()]
            out.append(_key_report(n, shown, [r for r in rows if r.day.startswith(month)], records.get(n), month))
        return out
    finally:
        await store.close()


def _key_report(name: str, shown: list[Any], this_month: list[Any], record: KeyRecord | None,
                month: str) -> dict[str, Any]:
    return {
        "name": name,
        "days": [{"day": r.day, "requests": r.requests, "tokens_in": r.tokens_in, "tokens_out": r.tokens_out}
                 for r in shown],
        "month": {"month": month, "tokens": sum(r.tokens for r in this_month),
                  "requests": sum(r.requests for r in this_month),
                  "monthly_tokens": record.monthly_tokens if record else None,
                  "daily_tokens": record.daily_tokens if record else None},
    }


def _print_usage(report: list[dict[str, Any]]) -> None:
    from rich.table import Table

    if not report:
        err.print("no usage recorded yet")
        return
    table = Table("key", "day", "requests", "tokens in", "tokens out", title="usage per key per UTC day")
    for key in report:
        for d in key["days"]:
            table.add_row(key["name"], d["day"], str(d["requests"]), str(d["tokens_in"]), str(d["tokens_out"]))
    out.print(table)
    for key in report:
        m = key["month"]
        budget = f" of {m['monthly_tokens']} ({100 * m['tokens'] / m['monthly_tokens']:.1f}%)" if m[
            "monthly_tokens"] else " (no monthly budget)"
        out.print(f"{key['name']}: {m['tokens']} tokens in {m['month']}{budget}, {m['requests']} requests")
