"""Migration scripts, one revision per file (``NNNN_slug.py``; Alembic skips this file)."""
