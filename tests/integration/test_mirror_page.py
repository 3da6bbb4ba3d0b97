"""The mirror's read-only page at ``/``, rendered by a real headless Chromium (Debian's package): the table of
verified revisions is in the DOM and visibly drawn in a screenshot; card data is escaped, never executed."""

from __future__ import annotations

import http.client
import shutil
import subprocess
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sync.importer import import_folder
from sync.mirror import make_mirror
from sync.store import RevisionRecord, Store
from tests.conftest import MINILM_REPO, TINY_REPO

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
HOSTILE = "acme/hostile-card"
HEADER_RGB = (0x1F, 0x3A, 0x5F)  # th background in mirror_page.STYLE
SNIPPET_RGB = (0x0F, 0x17, 0x20)  # the snippet blocks' background


@pytest.fixture(scope="module")
def page_mirror(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, minilm: Path
                ) -> Iterator[tuple[str, list[RevisionRecord]]]:
    base = tmp_path_factory.mktemp("page")
    store = Store(base / "store")
    hostile = base / "hostile"
    hostile.mkdir()
    (hostile / "README.md").write_text('---\ntags: ["<script>alert(1)</script>", "a&b"]\n---\n# x\n')
    (hostile / "config.json").write_text("{}\n")
    records = [import_folder(store, folder, repo).record
               for folder, repo in ((tiny_llama, TINY_REPO), (minilm, MINILM_REPO), (hostile, HOSTILE))]
    server = make_mirror(store, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", records
    finally:
        server.shutdown()
        server.server_close()


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, "/")
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    return resp.status, dict(resp.getheaders()), body


class Rows(HTMLParser):
    """Collects the text of each body row's cells, and any script element."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.scripts = 0
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_page_lists_every_revision_escaped(page_mirror: tuple[str, list[RevisionRecord]]) -> None:
    url, records = page_mirror
    status, headers, body = fetch(url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    parser = Rows()
    parser.feed(body)
    assert parser.scripts == 0 and "&lt;script&gt;alert(1)&lt;/script&gt;" in body and "a&amp;b" in body
    assert len(parser.rows) == 3
    by_repo = {row[0].split()[0]: row for row in parser.rows}
    for rec in records:
        row = by_repo[rec.repo]
        assert rec.commit[:12] in row[1] and "main" in row[1]
        assert f"hf download {rec.repo} --revision {rec.commit}" in row[5] and f"HF_ENDPOINT={url}" in row[5]
    assert by_repo[TINY_REPO][2].startswith("text-generation") and "1.7 MiB" in by_repo[TINY_REPO][3]
    status, headers, body = fetch(url, "HEAD")
    assert status == 200 and body == "" and int(headers["Content-Length"]) > 1000


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium; scripts/system-deps.sh)")
def test_page_renders_in_headless_chromium(page_mirror: tuple[str, list[RevisionRecord]], tmp_path: Path) -> None:
    from PIL import Image

    url, records = page_mirror
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"]
    dom = subprocess.run([*base, "--dump-dom", url + "/"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = Rows()
    parser.feed(dom.stdout)
    assert len(parser.rows) == len(records) and parser.scripts == 0

    shot = tmp_path / "page.png"
    res = subprocess.run([*base, f"--screenshot={shot}", url + "/"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    width, height = image.size
    pixels = image.load()
    assert pixels is not None
    header = sum(1 for x in range(width) for y in range(0, height // 3) if pixels[x, y] == HEADER_RGB)
    assert header > width * 20  # the header row: a wide band of the th colour
    # Down the snippet column, each revision shows two dark blocks: every scanline through one has a long run of
    # the block colour (its padding), whatever text crosses it; the gaps between blocks have none.
    xs = range(int(width * 0.6), width)
    blocks, inside = 0, False
    for y in range(height):
        run = longest = 0
        for x in xs:
            run = run + 1 if pixels[x, y] == SNIPPET_RGB else 0
            longest = max(longest, run)
        dark = longest >= 6
        blocks += dark and not inside
        inside = dark
    assert blocks == 2 * len(records), f"{blocks} snippet blocks drawn for {len(records)} revisions"
