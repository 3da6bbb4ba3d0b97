"""``hubserve batches``: the batch jobs in the gateway's shared state, newest first (read-only)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from sync.cli import ConfigOpt, VerboseOpt, cli_errors, out

StateUrlOpt = Annotated[
    str | None,
    typer.Option("--state-url", help="The gateway's state: sqlite:///path or redis://host:port/db (default: "
                 "$HUBSERVE_STATE_URL, else state.db beside keys.toml)."),
]


@cli_errors
def batches_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="A JSON array of Batch objects, with `key`.")] = False,
    state_url: StateUrlOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show at most this many (newest first).")] = 100,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """List batch jobs (/v1/batches of every key): id, status, endpoint, counts, created, key.

    Example: hubserve batches --json --state-url redis://127.0.0.1:6379/0
    """
    from server.keys_cli import keys_path

    url = state_url or os.environ.get("HUBSERVE_STATE_URL") or None
    default = keys_path(config, None).parent / "state.db"
    rows = asyncio.run(_rows(url, default, limit)) if url or default.exists() else []
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("id", "status", "endpoint", "completed", "failed", "total", "created", "key",
                  title=f"batches ({len(rows)})")
    for r in rows:
        counts = r["request_counts"]
        created = datetime.datetime.fromtimestamp(r["created_at"], datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(r["id"], r["status"], r["endpoint"], str(counts["completed"]), str(counts["failed"]),
                      str(counts["total"]), created, r["key"])
    out.print(table)


async def _rows(url: str | None, default: Path, limit: int) -> list[dict[str, Any]]:
    from server.batch.files import FileStore
    from server.batch.jobs import JobStore
    from server.state import open_state

    state = open_state(url, default)
    try:
        jobs = JobStore(state, FileStore(state))
        rows: list[dict[str, Any]] = []
        after = None
        while len(rows) < limit:
            page = await jobs.list(None, after, min(100, limit - len(rows)))
            rows += [{**job.to_batch().model_dump(mode="json"), "key": job.owner} for job in page.data]
            if not page.has_more:
                break
            after = page.last_id
        return rows
    finally:
        await state.close()
