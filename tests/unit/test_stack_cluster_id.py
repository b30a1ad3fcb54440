"""The KRaft cluster id the stack formats Kafka's storage with."""

import base64
from collections.abc import Iterator

from devkit.stack.services import new_cluster_id

# 0xF8 puts 62 in the first six bits, which URL-safe base64 writes as "-".
LEADING_DASH = bytes([0xF8]) + bytes(15)
PLAIN = bytes(range(16))


def test_an_id_that_would_read_as_an_option_is_drawn_again() -> None:
    draws: Iterator[bytes] = iter([LEADING_DASH, LEADING_DASH, PLAIN])
    cluster_id = new_cluster_id(lambda: next(draws))
    assert cluster_id == base64.urlsafe_b64encode(PLAIN).decode().rstrip("=")
    assert next(draws, None) is None


def test_ids_are_22_url_safe_characters_and_never_start_with_a_dash() -> None:
    ids = [new_cluster_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for cluster_id in ids:
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert base64.urlsafe_b64decode(cluster_id + "==") != b""
