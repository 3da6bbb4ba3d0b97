"""hubserve sync: pinned, verified mirroring of Hub revisions into a local store.

Nothing in this package imports ``server`` or any heavy ML library.
"""
