"""Which engine serves a model: vLLM or the transformers worker (models.toml ``backend``, auto by default).

``auto`` picks vLLM where its model registry has the architecture for the task (read from the snapshot's
config.json) and hubserve's task logic around vLLM covers the task; the transformers worker serves the rest:
question answering, seq2seq models (vLLM 0.32 dropped encoder-decoder), sentence pairs for zero-shot
classification (vLLM's /classify sends no ``token_type_ids``, so BERT-style pairs score wrong there),
architectures vLLM lacks (DistilBERT, DeBERTa, ...) and every image, audio and table task (speech recognition
goes to vLLM for Whisper, to the worker for CTC models). Pure except for reading config.json.
"""

from __future__ import annotations

from server.engines.base import Engine, ModelInfo
from server.settings import Settings
from server.tasks.catalog import MEDIA_TASKS, NOT_SERVED, TRANSCRIPTION_TASKS
from server.tasks.snapshot import architecture
from server.tasks.tokenizer import has_fast_tokenizer
from sync.errors import ConfigError

VLLM = "vllm"
TRANSFORMERS = "transformers"

# Tasks only vLLM serves here (generation with its server's full feature set, embeddings, chats with images).
VLLM_ONLY = frozenset({"text-generation", "feature-extraction", "sentence-similarity", "image-text-to-text"})
# Speech recognition: vLLM for the architectures it runs (Whisper: also /v1/audio/*), the worker for the rest
# (CTC models such as wav2vec2) or when models.toml says backend = "transformers".
VLLM_SPEECH = frozenset({"WhisperForConditionalGeneration"})
# Tasks the transformers worker serves (images, audio and tables included: server/engines/worker/media.py).
WORKER_TASKS = frozenset(
    {
        "text-classification", "token-classification", "fill-mask", "zero-shot-classification",
        "question-answering", "summarization", "translation", "text2text-generation", "text-ranking",
    }
) | MEDIA_TASKS
# Architectures vLLM 0.32's pooling runner serves per task, with the task logic hubserve does around it.
VLLM_ARCHITECTURES: dict[str, frozenset[str]] = {
    "text-classification": frozenset(
        {
            "BertForSequenceClassification", "RobertaForSequenceClassification",
            "XLMRobertaForSequenceClassification", "ModernBertForSequenceClassification",
        }
    ),
}
VLLM_ARCHITECTURES["text-ranking"] = VLLM_ARCHITECTURES["text-classification"]
# vLLM's /pooling with task token_classify: raw logits per token (server/hub/on_vllm.py does the rest).
VLLM_ARCHITECTURES["token-classification"] = frozenset(
    {
        "BertForTokenClassification", "RobertaForTokenClassification", "XLMRobertaForTokenClassification",
        "ModernBertForTokenClassification",
    }
)
VLLM_ARCHITECTURES["fill-mask"] = frozenset({"BertForMaskedLM"})
# Tasks where the gateway tokenizes for vLLM (character offsets, mask positions): they need a tokenizer.json.
GATEWAY_TOKENIZED = frozenset({"token-classification", "fill-mask"})


def choose_backend(info: ModelInfo) -> str:
    """``vllm`` or ``transformers`` for ``info``; ConfigError when the chosen backend cannot serve its task."""
    wanted = info.backend
    if info.task in NOT_SERVED:
        raise ConfigError(f"model '{info.name}': {info.task} is not served: {NOT_SERVED[info.task]}")
    if info.task in TRANSCRIPTION_TASKS:
        on_vllm = architecture(info.snapshot) in VLLM_SPEECH
        if wanted == VLLM and not on_vllm:
            raise ConfigError(f"model '{info.name}': vLLM runs {info.task} for {', '.join(sorted(VLLM_SPEECH))} "
                              f"only, not {architecture(info.snapshot)}; use \"transformers\" or \"auto\"")
        return VLLM if on_vllm and wanted != TRANSFORMERS else TRANSFORMERS
    if info.task in MEDIA_TASKS:
        if wanted == VLLM:
            raise ConfigError(f"model '{info.name}': backend = \"vllm\" does not serve {info.task}; "
                              "use \"transformers\" or \"auto\"")
        return TRANSFORMERS
    if info.task in VLLM_ONLY:
        if wanted == TRANSFORMERS:
            raise ConfigError(f"model '{info.name}': backend = \"transformers\" does not serve {info.task}; "
                              "use \"vllm\" or \"auto\"")
        return VLLM
    tokenizable = info.task not in GATEWAY_TOKENIZED or has_fast_tokenizer(info.snapshot)
    if wanted == VLLM:
        if info.task not in VLLM_ARCHITECTURES:
            raise ConfigError(f"model '{info.name}': backend = \"vllm\" does not serve {info.task} here; "
                              "use \"transformers\" or \"auto\"")
        if not tokenizable:
            raise ConfigError(f"model '{info.name}': {info.task} on vLLM needs the repo's tokenizer.json (the "
                              "gateway maps vLLM's per-token outputs to characters); use \"transformers\" or \"auto\"")
        return VLLM
    if wanted == TRANSFORMERS or (info.task in WORKER_TASKS and info.task not in VLLM_ARCHITECTURES):
        return TRANSFORMERS
    arch = architecture(info.snapshot)
    return VLLM if tokenizable and arch in VLLM_ARCHITECTURES.get(info.task, frozenset()) else TRANSFORMERS


def make_engine(info: ModelInfo, settings: Settings) -> Engine:
    """The engine for one model revision (the registry's default factory)."""
    if choose_backend(info) == TRANSFORMERS:
        from server.engines.transformers import TransformersEngine

        return TransformersEngine(info, settings)
    from server.engines.vllm import VLLMEngine

    return VLLMEngine(info, settings)
