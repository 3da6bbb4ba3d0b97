"""The transformers worker: a child process serving one model revision's Hub task on a private Unix socket.

Started by engines/transformers.py as ``python -m server.engines.worker``; torch and transformers are imported
only in this process (runner.py).
"""
