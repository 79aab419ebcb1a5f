"""When a progress bar is drawn: one rule for every bar (ingest, training pixels, training
steps)."""

from __future__ import annotations


def bar_disabled(wanted: bool) -> bool | None:
    """tqdm's ``disable`` argument: True when no bar is wanted; None otherwise, which tqdm
    reads as "draw only when the stream is a terminal". A bar redraws itself with carriage
    returns; written to a log file or a pipe its frames would be spliced into the text, so
    there only the summary lines appear."""
    return True if not wanted else None
