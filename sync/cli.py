"""The sync commands of the ``hubserve`` CLI: sync, daemon, import, mirror, status, verify, gc, rollback
(export and import-bundle live in cli_bundle).

Every command turns a HubserveError into one line on stderr and its exit code (1 failure, 2 bad
config or usage); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sync.errors import ConfigError, HubserveError, disk_full
from sync.paths import printable

if TYPE_CHECKING:
    from sync.store import FileEntry

F = TypeVar("F", bound=Callable[..., Any])
# soft_wrap: an error stays one line however narrow the terminal; piped output is not cut at 80 columns.
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="models.toml (default: $HUBSERVE_CONFIG, else ./models.toml).")
]
StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="Store directory (default: $HUBSERVE_STORE, else \\[store] path).")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and full tracebacks.")]
InsecurePublicOpt = Annotated[
    bool, typer.Option("--insecure-public", help="Allow a non-loopback address with no key configured.")
]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, has_auth: bool, insecure_public: bool, how: str) -> None:
    """Refuse to expose an unauthenticated server beyond this machine unless the operator says so."""
    if not has_auth and not insecure_public and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} with no API key configured (anyone who can reach it could use it); "
            f"{how}, or pass --insecure-public"
        )


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def cli_errors(fn: F) -> F:
    """Map HubserveError to a one-line message and exit code; tracebacks only with --verbose."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = bool(kwargs.get("verbose"))
        setup_logging(verbose)
        try:
            return fn(*args, **kwargs)
        except HubserveError as e:
            if verbose:
                err.print_exception()
            err.print(f"[red]error:[/red] {escape(printable(str(e)))}")  # a name from the network is no markup
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except OSError as e:  # a full disk the code below did not name itself: still one line, no traceback
            full = disk_full(e, e.filename or "the store")
            if full is None:
                raise
            if verbose:
                err.print_exception()
            err.print(f"[red]error:[/red] {full}")
            raise typer.Exit(full.exit_code) from None

    return wrapper  # type: ignore[return-value]


def expand_optional_values(argv: list[str]) -> list[str]:
    """Let ``--update`` take an optional value (``--update`` alone means every model).

    click cannot express an option whose value may be absent before another option or the end,
    so a bare ``--update`` becomes ``--update=*`` before parsing.
    """
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--update" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = "--update=*"
    return out


def register_sync_commands(app: typer.Typer) -> None:
    app.command("sync")(sync_cmd)
    app.command("import")(import_cmd)
    app.command("mirror")(mirror_cmd)
    app.command("status")(status_cmd)
    app.command("verify")(verify_cmd)
    app.command("gc")(gc_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("daemon")(daemon_cmd)
    from sync.cli_bundle import export_cmd, import_bundle_cmd  # imports this module: registered late

    app.command("export")(export_cmd)
    app.command("import-bundle")(import_bundle_cmd)


@cli_errors
def sync_cmd(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    update: Annotated[
        str | None,
        typer.Option(
            "--update",
            help="Re-resolve branch/tag pins (all models, or the one named) and print old -> new commits.",
            metavar="[NAME]",
            show_default=False,
        ),
    ] = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only sync these models.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Download and verify every pinned revision of models.toml into the store; write models.lock.

    Example: hubserve sync --config models.toml --update smollm2
    """
    from sync.manifest import load_config
    from sync.syncer import Syncer, describe

    cfg = load_config(config, store)
    if update not in (None, "*"):
        cfg.manifest.model(update)  # unknown name -> ConfigError
    syncer = Syncer(cfg, err)
    report = syncer.run(
        update={update} if update not in (None, "*") else None,
        update_all=update == "*",
        only=set(model) if model else None,
    )
    for result in report.models:
        line = describe(result)
        (out.print(line) if result.error is None else err.print(f"[red]error:[/red] {line}"))
    if not report.models:
        err.print("no models in the manifest")
    if not report.ok:
        raise typer.Exit(max(r.error.exit_code for r in report.models if r.error))


@cli_errors
def import_cmd(
    folder: Annotated[Path, typer.Argument(help="A folder in Hub repo layout (config.json, *.safetensors, ...).")],
    repo: Annotated[str, typer.Option("--repo", help="Repo id to store it under, org/name.")],
    store: StoreOpt = None,
    allow_pickle: Annotated[bool, typer.Option(help="Also import pickle weights (.bin .pt ...).")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Import a local folder as a verified revision; prints its commit (use it as `revision`).

    Example: hubserve import ./my-model --repo acme/my-model
    """
    from sync.importer import import_folder
    from sync.store import Store

    root = _store_path(store)
    result = import_folder(Store(root), folder, repo, allow_pickle=allow_pickle)
    for p in result.skipped_pickle:
        err.print(f"skipped pickle file {p} (pass --allow-pickle to import it)")
    err.print(f"imported {len(result.record.files)} file(s) of {repo} into {root}")
    out.print(result.record.commit)


def _store_path(store: Path | None) -> Path:
    """--store, else $HUBSERVE_STORE, else the config's [store] path if a config is found, else ./store."""
    from sync.manifest import find_config, parse_manifest, resolve_store_path

    if store is None and not os.environ.get("HUBSERVE_STORE"):
        try:
            path = find_config(None)
        except ConfigError:
            return resolve_store_path(None, None, None)
        return resolve_store_path(None, parse_manifest(path.read_text(encoding="utf-8"), str(path)), path)
    return resolve_store_path(store, None, None)


@cli_errors
def mirror_cmd(
    store: StoreOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8090,
    token_env: Annotated[
        str, typer.Option(help="Env var holding a bearer token clients must send (unset: no auth).")
    ] = "HUBSERVE_MIRROR_TOKEN",
    workers: Annotated[int, typer.Option(min=1, max=64, help="Processes serving the one port (one per core).")] = 1,
    trust_forwarded: Annotated[
        bool, typer.Option(help="Build links from X-Forwarded-Host/-Proto (behind a proxy you trust only).")
    ] = False,
    insecure_public: InsecurePublicOpt = False,
    keys_file: Annotated[
        Path | None, typer.Option(help="Named keys (`hubserve keys add --scopes mirror`): keys with the mirror scope "
                                       "are accepted besides the token (default $HUBSERVE_MIRROR_KEYS_FILE).")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve the store read-only as a Hub endpoint (HF_ENDPOINT=http://HOST:PORT for clients).

    Example: HUBSERVE_MIRROR_TOKEN=secret hubserve mirror --store /srv/hubserve --host 0.0.0.0 --port 8090
    """
    from sync.mirror import keys_file_env, serve_mirror
    from sync.store import Store

    root = _store_path(store)
    if not root.is_dir():
        raise ConfigError(f"store {root} does not exist; run `hubserve sync` or `hubserve import` first")
    token = os.environ.get(token_env) or None
    keys = keys_file or keys_file_env()
    if keys is not None and not keys.is_file():
        raise ConfigError(f"--keys-file {keys}: no such file (create keys with `hubserve keys add NAME --scopes "
                          "mirror --keys-file ...`)")
    check_bind(host, token is not None or keys is not None, insecure_public, f"set ${token_env} or --keys-file")
    auth = "token required" if token else "no auth"
    if keys is not None:
        auth = ("token or " if token else "") + f"a mirror-scoped key of {keys} required"
    err.print(f"mirror of {root} on http://{host}:{port} ({auth})")
    serve_mirror(Store(root), host, port, token, workers, trust_forwarded=trust_forwarded or None, keys_file=keys)


@cli_errors
def status_cmd(config: ConfigOpt = None, store: StoreOpt = None, verbose: VerboseOpt = False) -> None:
    """Show each model's pinned commit, state (missing / partial / verified), size and last sync.

    Example: hubserve status --config models.toml
    """
    from sync.inspect import model_status
    from sync.manifest import load_config
    from sync.progress import human_bytes

    cfg = load_config(config, store)
    table = Table(title=f"store {cfg.store_path}")
    for col in ("model", "repo", "commit", "state", "size", "last sync"):
        table.add_column(col)
    for st in model_status(cfg):
        table.add_row(
            st.name, st.repo, (st.commit or "unresolved")[:12], st.state,
            human_bytes(st.size) if st.size else "-", st.verified_at or "-",
        )
    out.print(table)


@cli_errors
def verify_cmd(config: ConfigOpt = None, store: StoreOpt = None, verbose: VerboseOpt = False) -> None:
    """Re-hash every verified revision in the store and report corruption (exit 1 if any).

    Example: hubserve verify --config models.toml
    """
    from sync.integrity import verify_and_mark
    from sync.store import Store

    root = store.absolute() if store else _config_store(config)
    st = Store(root)
    problems: list[str] = []
    records = st.revisions()
    for rec in records:
        found = verify_and_mark(st, rec)  # a corrupt revision is marked: no server starts an engine on it
        if found and st.get_revision(rec.repo, rec.commit) is None:
            out.print(f"{rec.repo}@{rec.commit[:12]}: removed while it was verified (gc), skipped")
            continue
        problems += found
        out.print(f"{rec.repo}@{rec.commit[:12]}: {'OK' if not found else f'{len(found)} problem(s)'}")
    for p in problems:
        err.print(f"[red]corrupt:[/red] {p}")
    if problems:
        raise typer.Exit(1)
    out.print(f"{len(records)} revision(s) verified in {root}")


def _config_store(config: Path | None) -> Path:
    from sync.manifest import load_config

    if config is None and os.environ.get("HUBSERVE_STORE"):
        return Path(os.environ["HUBSERVE_STORE"]).absolute()
    return load_config(config, None).store_path


@cli_errors
def gc_cmd(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Really delete (default: dry run).")] = False,
    server: Annotated[
        str | None,
        typer.Option(help="URL of a running `hubserve serve`: what it serves is kept (default: \\[daemon] server)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Go on when the server cannot be asked what it serves.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Remove revisions, blobs and temp files that no pin of models.toml references (dry run unless --yes).

    What to keep is read from models.lock under the store lock (a sync running meanwhile finishes first), and
    no revision a running server serves is removed.

    Example: hubserve gc --config models.toml --server http://127.0.0.1:8080 --yes
    """
    from sync.inspect import gc_keep, served_keep
    from sync.manifest import load_config
    from sync.progress import human_bytes
    from sync.store import Store

    cfg = load_config(config, store)
    st = Store(cfg.store_path)
    with st.locked():
        keep, warnings = gc_keep(cfg)
        serving, more = served_keep(st, server or cfg.manifest.daemon.server, force)
        for w in warnings + more:
            err.print(f"[yellow]warning:[/yellow] {w}")
        doomed = st.gc_plan(keep | serving)
        size = sum(p.lstat().st_size for p in doomed if p.is_file() and not p.is_symlink())
        for p in doomed:
            out.print(f"{'remove' if yes else 'would remove'} {p.relative_to(st.root)}")
        if yes:
            freed = st.remove(doomed)
            out.print(f"removed {len(doomed)} path(s), freed {human_bytes(freed)}")
        else:
            out.print(f"dry run: {len(doomed)} path(s), {human_bytes(size)}; pass --yes to delete")


@cli_errors
def rollback_cmd(
    name: Annotated[str, typer.Argument(help="Served name of the model (as in models.toml).")],
    config: ConfigOpt = None,
    store: StoreOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Pin a model back to its previous verified revision (models.lock keeps the history).

    A running `hubserve serve` swaps back to it without dropping requests. A model that follows its branch
    is not moved forward to the rolled-back-from commit again.

    Example: hubserve rollback smollm2 --config models.toml
    """
    from sync.lock import read_lock, rollback, write_lock
    from sync.manifest import load_config
    from sync.store import Store

    cfg = load_config(config, store)
    spec = cfg.manifest.model(name)  # unknown name -> ConfigError
    st = Store(cfg.store_path)

    def verified_files(commit: str) -> tuple[FileEntry, ...] | None:
        record = st.get_revision(spec.repo, commit)
        return record.files if record is not None else None

    with st.locked():
        lock = read_lock(cfg.lock_path)
        locked = lock.get(name)
        if locked is not None and locked.repo != spec.repo:
            raise ConfigError(f"model {name!r}: models.lock pins {locked.repo}, models.toml says {spec.repo}")
        old, new = rollback(lock, name, verified_files)
        write_lock(cfg.lock_path, lock)
    out.print(f"{name}: {old[:12]} -> {new[:12]} (rolled back)")


@cli_errors
def daemon_cmd(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    interval: Annotated[
        float | None,
        typer.Option(help="Seconds between reconciles (default: \\[daemon] interval, else 300).", min=0.1),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT for /webhooks/hub, /health, /metrics (default: \\[daemon] listen, else 127.0.0.1:8091)."
        ),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            help="URL of a running `hubserve serve`, polled for the served-commit metric (default: \\[daemon] server)."
        ),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Keep the store in step with models.toml and the Hub: sync at start, on every change of models.toml,
    on SIGHUP, every interval and on Hub webhooks; models with `follow = true` move with their branch or tag.

    Example: HUBSERVE_WEBHOOK_SECRET=... hubserve daemon --config models.toml --interval 300 --listen 0.0.0.0:8091
    """
    from sync.daemon import Daemon, DaemonOptions

    options = DaemonOptions(config=config, store=store, interval=interval, listen=listen, server=server)
    raise typer.Exit(Daemon(options, err).run())
