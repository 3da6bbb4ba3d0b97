"""Task kinds every family and both backends agree on (Hub pipeline tags)."""

from __future__ import annotations

GENERATIVE_TASKS = frozenset({"text-generation", "text2text-generation", "conversational", "image-text-to-text"})
EMBEDDING_TASKS = frozenset({"feature-extraction", "sentence-similarity", "embedding"})
RERANK_TASKS = frozenset({"text-ranking"})
SCORE_TASKS = RERANK_TASKS | EMBEDDING_TASKS  # vLLM's /v1/score: cross-encoders, or cosine of embeddings
TRANSCRIPTION_TASKS = frozenset({"automatic-speech-recognition"})
