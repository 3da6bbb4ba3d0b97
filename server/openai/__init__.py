"""OpenAI-compatible routes: bytes passed through to the model's vLLM server, routed by the `model` field."""
