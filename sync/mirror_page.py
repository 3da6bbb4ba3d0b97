"""The mirror's read-only web page at ``/``: every verified revision with its size, task and a copy-paste
snippet. Server-rendered HTML with inline CSS and no script; every value is escaped."""

from __future__ import annotations

from html import escape

from sync.mirror_catalog import repo_facts, revision_label
from sync.progress import human_bytes
from sync.store import RevisionRecord, Store

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem;color:#1d2430;background:#fff}
h1{font-size:1.4rem;margin:0 0 .25rem}p.sub{color:#5b6473;margin:0 0 1.25rem}
table{border-collapse:collapse;width:100%}
th{background:#1f3a5f;color:#fff;text-align:left;padding:.5rem .6rem;font-weight:600}
td{border-bottom:1px solid #d9dee6;padding:.5rem .6rem;vertical-align:top}
tr:nth-child(even) td{background:#f4f6f9}
code{font:12px/1.4 ui-monospace,monospace}
td.repo{min-width:16rem}td.verified,td.size,td.commit,td.task{white-space:nowrap}
td.snippet code{display:block;white-space:pre-wrap;word-break:break-all;background:#0f1720;color:#e6edf3;
padding:.45rem .6rem;margin-bottom:.35rem;border-radius:4px;user-select:all}
.tags{display:flex;flex-wrap:wrap;gap:.2rem;margin-top:.3rem}
.tag{white-space:nowrap;background:#e7eef8;color:#1f3a5f;border-radius:3px;padding:0 .35rem;font-size:12px}
.empty{padding:2rem;text-align:center;color:#5b6473}
"""


def _row(store: Store, record: RevisionRecord, endpoint: str) -> str:
    facts = repo_facts(store, record)
    refs = revision_label(store, record)
    snippet = f"HF_ENDPOINT={endpoint} hf download {record.repo} --revision {record.commit}"
    python = (f"# HF_ENDPOINT={endpoint}\nfrom transformers import AutoModel\n"
              f"AutoModel.from_pretrained({record.repo!r}, revision={record.commit!r})")
    tags = "".join(f'<span class="tag">{escape(t)}</span>' for t in facts.tags[:8])
    return (
        "<tr>"
        f'<td class="repo"><strong>{escape(record.repo)}</strong><div class="tags">{tags}</div></td>'
        f'<td class="commit"><code title="{escape(record.commit)}">{escape(record.commit[:12])}</code>'
        f"<br>{escape(refs)}</td>"
        f'<td class="task">{escape(facts.pipeline_tag or "-")}<br>'
        f'<small>{escape(facts.library_name or "")}</small></td>'
        f'<td class="size">{escape(human_bytes(record.size))}<br><small>{len(record.files)} files</small></td>'
        f'<td class="verified">{escape(record.verified_at.replace("T", " "))}</td>'
        f'<td class="snippet"><code>{escape(snippet)}</code><code>{escape(python)}</code></td>'
        "</tr>"
    )


def render_index(store: Store, endpoint: str) -> str:
    """The whole page; ``endpoint`` is the URL clients should put in HF_ENDPOINT."""
    records = sorted(store.revisions(), key=lambda r: (r.repo.lower(), r.verified_at), reverse=False)
    rows = "".join(_row(store, r, endpoint) for r in records)
    if not rows:
        rows = '<tr><td colspan="6" class="empty">No verified revisions yet: run <code>hubserve sync</code> ' \
               "or <code>hubserve import-bundle</code>.</td></tr>"
    repos = len({r.repo for r in records})
    total = human_bytes(sum(r.size for r in records))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>hubserve mirror</title><style>{STYLE}</style></head><body>"
        "<h1>hubserve mirror</h1>"
        f'<p class="sub">{repos} model(s), {len(records)} verified revision(s), {escape(total)}. '
        f"Point clients here with <code>HF_ENDPOINT={escape(endpoint)}</code>.</p>"
        '<table id="models"><thead><tr><th>Model</th><th>Commit</th><th>Task</th><th>Size</th>'
        "<th>Verified</th><th>Use it</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></body></html>"
    )
