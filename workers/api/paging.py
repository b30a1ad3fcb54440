"""Cursor pagination as OpenAI lists do it: ``after`` (an id in the list), ``limit``, ``order``.

Pure: the caller passes the items already sorted newest first with their ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from workers.api.openai_format import ApiError

T = TypeVar("T")

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
_MAX_CURSOR = 256


@dataclass(frozen=True)
class PageRequest:
    after: str | None
    limit: int
    ascending: bool


def page_request(query: Mapping[str, str], *, orderable: bool) -> PageRequest:
    """The page a query string asks for; 400 for a bad ``limit``, ``order`` or ``after``."""
    raw_limit = query.get("limit")
    limit = DEFAULT_LIMIT
    if raw_limit is not None:
        if not raw_limit.isascii() or not raw_limit.isdigit() or len(raw_limit) > 4:
            raise ApiError(
                400, f"limit must be a whole number, not {raw_limit[:20]!r}.", param="limit"
            )
        limit = int(raw_limit)
        if not 1 <= limit <= MAX_LIMIT:
            raise ApiError(400, f"limit must be between 1 and {MAX_LIMIT}.", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc") or (order == "asc" and not orderable):
        raise ApiError(400, "order must be 'desc' (or 'asc' where supported).", param="order")
    after = query.get("after")
    if after is not None and (not after or len(after) > _MAX_CURSOR):
        raise ApiError(400, "after must be an id from a previous page.", param="after")
    return PageRequest(after, limit, order == "asc")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    has_more: bool


def page(items: Sequence[T], request: PageRequest, id_of: Callable[[T], str]) -> Page[T]:
    """The items after the cursor; an ``after`` that names no item of the list is a 400
    (it would otherwise read as an empty, finished list)."""
    ordered = list(reversed(items)) if request.ascending else list(items)
    start = 0
    if request.after is not None:
        ids = [id_of(item) for item in ordered]
        if request.after not in ids:
            raise ApiError(400, "after does not name an item of this list.", param="after")
        start = ids.index(request.after) + 1
    chosen = ordered[start : start + request.limit]
    return Page(chosen, start + request.limit < len(ordered))
