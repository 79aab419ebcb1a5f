"""Alembic migrations of the searchsvc metadata schema (:mod:`searchsvc.storage.db.schema`).

:class:`searchsvc.storage.db.Database` runs them programmatically (``script_location`` is this
package's directory); ``alembic -c alembic.ini ...`` in a checkout runs the same ``env.py``.
"""
