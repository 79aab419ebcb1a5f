"""Celery workers: ``celery -A workers worker ...`` (Celery's convention for a package).

The app is loaded on first access, not on import: ``workers.command`` (the worker command
line, for scripts and tests) must be importable without a broker configured, and
``workers.celery_app`` refuses to start without one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    app: Celery
    celery: Celery

__all__ = ["app", "celery"]


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from workers.celery_app import app  # its ``include`` registers workers.tasks

        return app
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
