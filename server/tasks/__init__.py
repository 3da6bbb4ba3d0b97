"""The backend-neutral task layer, imported by the Hub family, the transformers worker and the vLLM path alike:

- catalog.py: every task, what it takes in and answers, its kind of work and default time limit, its client
  method; the task sets the families and engines use are views of it;
- requests.py: the Hub text task request models and their parsing (one per task);
- media_requests.py: the image, audio and table task request models (every body form InferenceClient sends);
- answers.py: the pure answer logic (label maps, top_k, entity aggregation, span decoding), checked against
  transformers' pipelines;
- tokenizer.py: a snapshot's fast tokenizer in the gateway (tokenizers, no transformers);
- snapshot.py: the one cached reader of a snapshot's JSON files.
"""
