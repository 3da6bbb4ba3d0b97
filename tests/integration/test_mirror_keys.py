"""`hubserve mirror` accepts named keys (`hubserve keys`) with the mirror scope besides its token, through the
stock huggingface_hub client; other keys get 403 naming the scope, expired ones 401 saying when."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError

from server.ops.keys import new_key, read_keys, write_keys
from sync.importer import import_folder
from sync.mirror import make_mirror
from sync.store import Store

pytestmark = pytest.mark.integration

REPO = "acme/tiny"
TOKEN = "mirror-token-0123456789"


@pytest.fixture
def keyed_mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    store = Store(tmp_path / "store")
    store.ensure()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"model_type": "bert"}\n')
    import_folder(store, tmp_path / "src", REPO)
    keys_file = tmp_path / "keys.toml"
    server = make_mirror(store, "127.0.0.1", 0, token=TOKEN, keys_file=keys_file)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", keys_file
    server.shutdown()
    server.server_close()


def test_mirror_scoped_keys_and_the_token(keyed_mirror: tuple[str, Path], tmp_path: Path) -> None:
    url, keys_file = keyed_mirror
    mirror_key, mirror_record = new_key("puller", scopes=("mirror",))
    tenant_key, tenant = new_key("tenant")  # default scopes: inference, batch
    old_key, old = new_key("old", scopes=("mirror",), expires="2020-01-01T00:00:00+00:00")
    write_keys(keys_file, {r.id: r for r in (mirror_record, tenant, old)})

    path = hf_hub_download(REPO, "config.json", endpoint=url, token=mirror_key, cache_dir=tmp_path / "cache")
    assert Path(path).read_text() == '{"model_type": "bert"}\n'
    assert HfApi(endpoint=url, token=TOKEN).model_info(REPO).id == REPO  # the mirror's own token still works
    denied = httpx.get(f"{url}/api/models/{REPO}", headers={"Authorization": f"Bearer {tenant_key}"})
    assert denied.status_code == 403 and "lacks the `mirror` scope" in denied.text
    expired = httpx.get(f"{url}/api/models/{REPO}", headers={"Authorization": f"Bearer {old_key}"})
    assert expired.status_code == 401 and "expired at 2020-01-01T00:00:00" in expired.text
    with pytest.raises(RepositoryNotFoundError):  # no credentials: a 401, which the client reads as not found
        HfApi(endpoint=url, token=False).model_info(REPO)

    write_keys(keys_file, {r.id: r for r in read_keys(keys_file).values() if r.name != "puller"})  # revoked
    assert httpx.get(f"{url}/api/models/{REPO}", headers={"Authorization": f"Bearer {mirror_key}"}).status_code == 401


def test_the_mirror_command_takes_a_keys_file_and_names_a_missing_one(tmp_path: Path) -> None:
    """`hubserve mirror --keys-file`: a public bind with keys but no token is allowed (the keys are its auth);
    a keys file that does not exist is a one-line error, not a mirror that accepts nothing."""
    store = Store(tmp_path / "store")
    store.ensure()
    missing = subprocess.run(
        [sys.executable, "-m", "server.cli", "mirror", "--store", str(store.root), "--keys-file",
         str(tmp_path / "nope.toml")], capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("HUBSERVE_")},
    )
    assert missing.returncode != 0 and "nope.toml: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
