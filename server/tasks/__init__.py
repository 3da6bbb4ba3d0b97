"""The backend-neutral task layer: which tasks exist and what kind of work each is (see catalog.py)."""
