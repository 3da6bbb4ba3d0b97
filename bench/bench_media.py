"""Image classification and speech recognition: hubserve's transformers worker (dynamic batching) vs a plain
transformers pipeline looping over the same inputs in one process.

The models are random ones of a realistic shape, built here once (answers do not matter, time does): a ViT
image classifier (224x224 input, patch 16, ``--vit-hidden``/``--vit-layers``, 1000 labels) and a wav2vec2 CTC
speech recognizer (``--w2v-hidden``/``--w2v-layers``, character vocabulary), fp32. One file per request, as
InferenceClient sends it without parameters (the raw bytes as the body, ``POST /models/{name}``), at each
concurrency; requests/s and latency p50/p99. The pipeline rows call ``pipe(decoded_input)`` one by one on the
same inputs, decoding included, as a script would.

    .venv/bin/python bench/bench_media.py --concurrency 1,32 --requests 128
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_serve import free_port, process, wait_ready  # noqa: E402
from sync.importer import import_folder  # noqa: E402
from sync.store import Store  # noqa: E402

CACHE = ROOT / ".cache" / "bench"


def readme(folder: Path, tag: str) -> None:
    (folder / "README.md").write_text(f"---\npipeline_tag: {tag}\n---\n# benchmark model (random weights)\n")


def vit_dir(hidden: int, layers: int) -> Path:
    out = CACHE / f"vit-{hidden}-{layers}"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden, num_labels=1000,
                       id2label={i: f"class_{i}" for i in range(1000)})
    ViTForImageClassification(config).eval().save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(out)
    readme(out, "image-classification")
    return out


def ctc_dir(hidden: int, layers: int) -> Path:
    out = CACHE / f"w2v-{hidden}-{layers}"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    out.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|", *"abcdefghijklmnopqrstuvwxyz'"])}
    (out / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(out / "vocab.json"), word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                            feat_extract_norm="layer", do_stable_layer_norm=True, pad_token_id=0)
    Wav2Vec2ForCTC(config).eval().save_pretrained(out, safe_serialization=True)
    readme(out, "automatic-speech-recognition")
    return out


def images(n: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def clips(n: int, seconds: float) -> list[bytes]:
    import soundfile

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t = np.arange(int(16000 * seconds)) / 16000
        samples = 0.3 * np.sin(2 * np.pi * (200 + 20 * i) * t) + rng.normal(0, 0.02, t.shape)
        buf = io.BytesIO()
        soundfile.write(buf, samples.astype(np.float32), 16000, format="WAV")
        out.append(buf.getvalue())
    return out


def stats(name: str, latencies: list[float], wall: float) -> dict[str, Any]:
    lat = sorted(latencies)
    return {"name": name, "rps": len(lat) / wall, "p50": statistics.median(lat) * 1000,
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000}


async def drive(url: str, model: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    queue = list(bodies)
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one_worker() -> None:
            while queue:
                body = queue.pop()
                started = time.perf_counter()
                (await client.post(f"{url}/models/{model}", content=body)).raise_for_status()
                latencies.append(time.perf_counter() - started)

        for body in bodies[:4]:  # warm-up
            (await client.post(f"{url}/models/{model}", content=body)).raise_for_status()
        started = time.perf_counter()
        await asyncio.gather(*(one_worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return stats(f"hubserve {model} c={concurrency}", latencies, wall)


def pipeline_loop(task: str, folder: Path, bodies: list[bytes]) -> dict[str, Any]:
    import soundfile
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline(task, model=str(folder), device="cpu")

    def decode(body: bytes) -> Any:
        if task == "image-classification":
            return Image.open(io.BytesIO(body)).convert("RGB")
        return soundfile.read(io.BytesIO(body), dtype="float32")[0]

    for body in bodies[:4]:
        pipe(decode(body))
    latencies = []
    started = time.perf_counter()
    for body in bodies:
        t = time.perf_counter()
        pipe(decode(body))
        latencies.append(time.perf_counter() - t)
    return stats(f"pipeline loop {task}", latencies, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--vit-hidden", type=int, default=384)
    parser.add_argument("--vit-layers", type=int, default=6)
    parser.add_argument("--w2v-hidden", type=int, default=384)
    parser.add_argument("--w2v-layers", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each audio clip")
    parser.add_argument("--tasks", default="image-classification,automatic-speech-recognition")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    models = {"image-classification": ("vit", vit_dir(args.vit_hidden, args.vit_layers), images(args.requests)),
              "automatic-speech-recognition": ("ctc", ctc_dir(args.w2v_hidden, args.w2v_layers),
                                               clips(args.requests, args.seconds))}
    rows: dict[str, list[dict[str, Any]]] = {t: [pipeline_loop(t, models[t][1], models[t][2])] for t in tasks}
    with tempfile.TemporaryDirectory(prefix="hubserve-bench-media-") as tmp:
        root = Path(tmp)
        store = Store(root / "store")
        entries = []
        for task in tasks:
            name, folder, _ = models[task]
            commit = import_folder(store, folder, f"hubserve-bench/{name}").record.commit
            entries.append(f'[[models]]\nname = "{name}"\nrepo = "hubserve-bench/{name}"\nrevision = "{commit}"\n'
                           f"[models.engine]\nbatch_wait_ms = {args.batch_wait_ms}\n")
        config = root / "models.toml"
        config.write_text('[store]\npath = "store"\n\n' + "\n".join(entries), encoding="utf-8")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port)]
        with process(cmd, {"HUBSERVE_LOG_LEVEL": "warning"}, root / "serve.log"):
            wait_ready(url, "/ready", timeout=900)
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                for task in tasks:
                    rows[task].append(asyncio.run(drive(url, models[task][0], models[task][2], concurrency)))
    print("| contender | requests/s | vs pipeline | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for task in tasks:
        base = float(rows[task][0]["rps"])
        for row in rows[task]:
            print(f"| {row['name']} | {row['rps']:.1f} | {row['rps'] / base:.2f}x | {row['p50']:.1f} | "
                  f"{row['p99']:.1f} |")


if __name__ == "__main__":
    main()
