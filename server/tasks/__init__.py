"""The backend-neutral task layer, imported by the Hub family, the transformers worker and the vLLM path alike:

- catalog.py: which tasks exist and what kind of work each is;
- requests.py: the Hub task request models and their parsing (one per task);
- answers.py: the pure answer logic (label maps, top_k, entity aggregation, span decoding), checked against
  transformers' pipelines;
- tokenizer.py: a snapshot's fast tokenizer in the gateway (tokenizers, no transformers).
"""
