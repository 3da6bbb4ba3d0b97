"""``hubserve export`` and ``hubserve import-bundle``: carry verified revisions across an air gap."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sync.cli import ConfigOpt, StoreOpt, VerboseOpt, _store_path, cli_errors, err, out
from sync.errors import ConfigError

if TYPE_CHECKING:
    from sync.manifest import Config


@cli_errors
def export_cmd(
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Bundle file to write (.zst: zstd-compressed).")],
    names: Annotated[list[str] | None, typer.Argument(help="Models (served names) to export; default: all.")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
    since: Annotated[
        Path | None, typer.Option(help="The receiving side's models.lock: carry only what it lacks.")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="Write parts of at most this size (650M, 4G): FILE.000, FILE.001, ...")
    ] = None,
    zstd: Annotated[bool | None, typer.Option("--zstd/--no-zstd", help="Compress (default: when FILE ends in .zst).")]
    = None,
    sign: Annotated[Path | None, typer.Option("--sign", help="ed25519 private key (PEM) to sign with.")] = None,
    verify: Annotated[
        bool, typer.Option(help="Re-hash every blob while exporting (import always re-hashes every byte).")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write the pinned, verified revisions of models.lock into one bundle (streamed: constant memory).

    Example: hubserve export smollm2 --out /media/usb/models.tar --since inside.lock --split 4G --sign key.pem
    """
    from sync.bundle import export_bundle, load_since, plan_export
    from sync.bundle_parts import parse_size
    from sync.bundle_sign import fingerprint, load_private_key
    from sync.lock import read_lock
    from sync.manifest import load_config
    from sync.progress import DownloadProgress, human_bytes
    from sync.store import Store

    cfg = load_config(config, store)
    key = load_private_key(sign) if sign else None
    part_size = parse_size(split) if split else None
    st = Store(cfg.store_path)
    compress = zstd if zstd is not None else out_file.suffix == ".zst"
    # Under the store lock: the pins read from models.lock and their blobs stay as they are (no gc, no sync
    # moving them) until the last byte is written.
    with st.locked():
        manifest = plan_export(st, read_lock(cfg.lock_path), names, load_since(since) if since else None)
        total = sum(e.size for _, e in manifest.blobs)
        with DownloadProgress(f"export {out_file.name}", total, len(manifest.blobs), err,
                              verbs=("writing", "wrote")) as progress:
            result = export_bundle(st, manifest, out_file, split=part_size, zstd=compress, key=key, verify=verify,
                                   progress=progress.advance)
    for m in manifest.models:
        err.print(f"{m.name}: {m.repo}@{m.commit[:12]}")
    signed = f", signed by key {fingerprint(key.public_key())}" if key else ", unsigned"
    err.print(f"{len(manifest.revisions)} revision(s), {len(manifest.blobs)} blob(s), {human_bytes(total)} of files"
              f"{' (incremental)' if since else ''}{signed}")
    for p in result.paths:
        out.print(str(p))


@cli_errors
def import_bundle_cmd(
    files: Annotated[list[Path], typer.Argument(help="The bundle file, or all its parts in order.")],
    store: StoreOpt = None,
    config: ConfigOpt = None,
    trust: Annotated[
        list[Path] | None, typer.Option("--trust", help="ed25519 public key (PEM or OpenSSH) to require; repeatable.")
    ] = None,
    allow_downgrade: Annotated[
        bool, typer.Option("--allow-downgrade", help="Let the bundle move a pin back to a commit it was pinned to.")
    ] = False,
    allow_unsigned: Annotated[
        bool, typer.Option("--allow-unsigned", help="With --trust: accept an unsigned bundle or another signer.")
    ] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Pickle files of models that models.toml does not name.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Verify a bundle while streaming it, promote its revisions into the store, and merge models.lock.

    The receiving models.toml's include/exclude and allow_pickle apply to every file; a bundle pinning a
    model to a commit it was pinned to before is refused (--allow-downgrade).

    Example: hubserve import-bundle /media/usb/models.tar.000 /media/usb/models.tar.001 --trust site.pub
    """
    from rich.markup import escape

    from sync.bundle import BundleManifest, ImportOptions, import_bundle
    from sync.bundle_sign import load_public_key
    from sync.progress import DownloadProgress, human_bytes
    from sync.store import Store

    root, cfg = _import_target(config, store)
    keys = [load_public_key(p) for p in trust or []]
    lock_path = cfg.lock_path if cfg else None
    with contextlib.ExitStack() as shown:

        def show(manifest: BundleManifest) -> Callable[[int], None]:
            total = sum(e.size for _, e in manifest.blobs)
            bar = DownloadProgress(f"import {files[0].name}", total, len(manifest.blobs), err,
                                   verbs=("verifying", "verified"))
            return shown.enter_context(bar).advance

        options = ImportOptions(allow_downgrade, allow_unsigned, allow_pickle)
        result = import_bundle(Store(root), files, keys, lock_path, progress=show,
                               receiving=cfg.manifest if cfg else None, options=options)
    if result.signer is None:
        err.print("[bold yellow]warning: the bundle is UNSIGNED[/bold yellow]: nothing proves where it came from "
                  "(sign with `export --sign`, require with `--trust`)")
    elif keys and not result.signer_trusted:
        err.print(f"[bold yellow]warning: signed by key {result.signer}, NOT one of the --trust keys[/bold yellow] "
                  "(imported because of --allow-unsigned)")
    else:
        err.print(f"signature by key {result.signer}: {'trusted' if keys else 'valid (no --trust given)'}")
    for line in result.skipped:
        err.print(f"[yellow]skipped:[/yellow] {escape(line)}")
    for rec in result.promoted:
        out.print(f"{rec.repo}@{rec.commit}: verified and promoted ({human_bytes(rec.size)})")
    for rec in result.already:
        out.print(f"{rec.repo}@{rec.commit}: already in the store")
    err.print(f"{result.blobs_added} blob(s), {human_bytes(result.bytes_read)} verified into {root}")
    if cfg is not None:
        err.print(f"models.lock merged: {cfg.lock_path}")
        known = set(cfg.manifest.names())
        for m in result.manifest.models:
            if m.name not in known:
                err.print(f"[yellow]warning:[/yellow] {m.name} is not in {cfg.path.name}; add it or `hubserve sync` "
                          f"drops its lock entry: {escape('[[models]]')} name = \"{m.name}\" repo = \"{m.repo}\" "
                          f"revision = \"{m.revision}\"")
    else:
        err.print("no models.toml found: models.lock not written (pass --config to merge it)")


def _import_target(config: Path | None, store: Path | None) -> tuple[Path, Config | None]:
    """The store, and the config whose lock to merge: --config (or ./models.toml) when there is one."""
    from sync.manifest import find_config, load_config

    try:
        path = find_config(config)
    except ConfigError:
        if config is not None:
            raise
        return _store_path(store), None
    cfg = load_config(path, store)
    return cfg.store_path, cfg
