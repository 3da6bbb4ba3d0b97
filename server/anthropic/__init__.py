"""Anthropic Messages routes (``/v1/messages``, ``/v1/messages/count_tokens``): bytes passed through to the model's
vLLM server (which speaks Messages), errors in Anthropic's shape."""
