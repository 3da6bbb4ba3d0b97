#!/usr/bin/env python3
"""The demo's waiting line and banner: wait until a hubserve server is ready, then print its URL, the models it
serves and copy-paste client examples (curl, openai, InferenceClient). Standard library only.

Usage: scripts/demo_banner.py URL [--log PATH ...] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_ready(url: str, timeout: float) -> dict[str, dict[str, object]]:
    """Poll /ready, showing each model's state on one line; the models of /health once all are ready."""
    start = time.monotonic()
    last = None
    while True:
        try:
            status, body = _get(f"{url}/ready")
        except (OSError, ValueError):
            status, body = 0, {}
        elapsed = time.monotonic() - start
        states = body.get("models") or {}
        shown = ", ".join(f"{k}: {v}" for k, v in states.items()) if isinstance(states, dict) else ""
        line = f"  waiting for the engines ({elapsed:4.0f} s) {shown or 'gateway starting'}"
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{line}\033[K")
        elif shown != last:  # a log file or a pipe: one line per change
            sys.stderr.write(line + "\n")
        last = shown
        sys.stderr.flush()
        if status == 200:
            sys.stderr.write("\n")
            return _get(f"{url}/health")[1]["models"]  # type: ignore[return-value]
        if any(v == "failed" for v in (states.values() if isinstance(states, dict) else ())) or elapsed > timeout:
            sys.stderr.write("\n")
            raise SystemExit("demo: a model did not start; see the server log")
        time.sleep(1)


# SmolLM2-Instruct's model card samples with temperature 0.2 and top_p 0.9; vLLM's default (the generation config's
# temperature 1.0, no token cap) rambles for a page.
SAMPLING_JSON = '"temperature": 0.2, "top_p": 0.9, "max_tokens": 64'
SAMPLING_PY = "temperature=0.2, top_p=0.9, max_tokens=64"


def banner(url: str, models: dict[str, dict[str, object]], logs: list[str]) -> str:
    chat = next((n for n, m in models.items() if m.get("task") == "text-generation"), next(iter(models)))
    embed = next((n for n, m in models.items() if m.get("task") == "feature-extraction"), None)
    rows = "\n".join(f"   {n:<10} {m['repo']} @ {str(m['commit'])[:12]}  ({m['task']})" for n, m in models.items())
    lines = [
        "",
        "=" * 78,
        f" hubserve is serving on {url}",
        rows,
        *(f" log: {path}" for path in logs),
        "-" * 78,
        " curl:",
        f"   curl {url}/v1/chat/completions -H 'content-type: application/json' \\",
        f"     -d '{{\"model\": \"{chat}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Say hi\"}}], "
        f"{SAMPLING_JSON}}}'",
        " openai (pip install openai): chat, then the Responses API:",
        f"   python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='none'); "
        f"print(c.chat.completions.create(model='{chat}', messages=[{{'role': 'user', 'content': 'Say hi'}}], "
        f"{SAMPLING_PY}).choices[0].message.content)\"",
        f"   python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='none'); "
        f"print(c.responses.create(model='{chat}', input='What is the capital of France?', "
        f"temperature=0.2, top_p=0.9, max_output_tokens=64).output_text)\"",
        " anthropic (pip install anthropic): Messages, as ANTHROPIC_BASE_URL agents speak it:",
        f"   python -c \"import anthropic; c = anthropic.Anthropic(base_url='{url}', api_key='none'); "
        f"print(c.messages.create(model='{chat}', max_tokens=64, messages=[{{'role': 'user', 'content': 'Say hi'}}], "
        f"extra_body={{'temperature': 0.2, 'top_p': 0.9}}).content[0].text)\"",
        " huggingface_hub InferenceClient:",
        f"   python -c \"from huggingface_hub import InferenceClient; c = InferenceClient(base_url='{url}'); "
        f"print(c.text_generation('The sky is', max_new_tokens=12, temperature=0.2, top_p=0.9))\"",
    ]
    if embed:
        lines.append(
            f"   python -c \"from huggingface_hub import InferenceClient; "
            f"print(InferenceClient(model='{url}/models/{models[embed]['repo']}').feature_extraction('hi').shape)\""
        )
    lines += ["=" * 78, " Ctrl-C stops the server and the mirror.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--log", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=900)
    ns = parser.parse_args()
    print(banner(ns.url, wait_ready(ns.url, ns.timeout), ns.log))


if __name__ == "__main__":
    main()
