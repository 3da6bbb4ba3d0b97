"""Hugging Face Inference API routes (/models/{repo_id}, /v1, /): what huggingface_hub.InferenceClient calls."""
