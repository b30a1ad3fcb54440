"""What became of an input event, in every connector's words."""

from __future__ import annotations

OUTCOMES = ("request", "invalidation", "duplicate", "skipped", "dead_letter")
"""Every input event a connector reads ends with exactly one of these, so its outcome table
adds up to the events read."""
