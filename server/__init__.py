"""hubserve server: the inference gateway in front of per-model vLLM engines."""
