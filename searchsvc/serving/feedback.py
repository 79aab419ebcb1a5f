"""Feedback on answered queries: which result was right, or wrong (the learning loop's
labels)."""

from __future__ import annotations

from searchsvc.core.errors import NotFoundError
from searchsvc.storage.db import Database, Feedback, Product, QueryLog


def record_feedback(db: Database, query_id: str, product_id: str, *, positive: bool) -> int:
    """Log which result was right (or wrong) for a query; returns the feedback id."""
    with db.session() as session:
        query = session.get(QueryLog, query_id)
        if query is None:
            raise NotFoundError(f"query {query_id}: no such query in the log")
        if session.get(Product, product_id) is None:
            raise NotFoundError(f"product {product_id}: no such product")
        row = Feedback(query_id=query_id, product_id=product_id, positive=positive)
        session.add(row)
        session.flush()
        return row.id
