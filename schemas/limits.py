"""Size limits on every event: the bounds a hostile or broken producer cannot push us past.

The defaults are part of the contract (docs/contracts.md). The pydantic models enforce
:data:`DEFAULT_LIMITS` when they validate (string lengths, map entries, array items, tensor
bytes); the codec enforces ``max_message_bytes`` of the :class:`Limits` it is given before it
decodes anything, which also bounds the work the decoder can be made to do: every array item
and map entry of our schemas occupies at least one byte on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Upper bounds on one event. All values are inclusive maxima."""

    max_message_bytes: int = MiB
    """Whole framed message, header included (Kafka's default ``message.max.bytes`` is ~1 MiB)."""
    max_name_length: int = 256
    """Identifiers: ids, model names, versions, topics, tenants, map keys."""
    max_string_length: int = 256 * 1024
    """Free text: prompts, chat messages, error messages, string feature values (characters)."""
    max_map_entries: int = 1024
    """Entries of any map (features, attributes)."""
    max_array_items: int = 4096
    """Items of any array (tensors, chat messages, metrics, attributions, ...)."""
    max_tensor_dims: int = 16
    """Dimensions of one tensor's shape."""
    max_tensor_bytes: int = MiB
    """Raw data bytes of one tensor, and of all tensors of one event together."""

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 1:
                raise ValueError(f"limit {name} must be >= 1, got {getattr(self, name)}")


DEFAULT_LIMITS = Limits()
