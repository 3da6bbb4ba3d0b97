"""The OpenAI Batch API: ``/v1/files`` and ``/v1/batches`` (routes.py), batch records in the shared state
(jobs.py, files.py), and the runner that runs their lines through the gateway itself (runner.py, inproc.py)."""
