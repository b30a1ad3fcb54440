"""Personal data policy: what of a request may leave the worker, and in what form.

Pure functions, no I/O. The backend still receives the real values (the model needs them);
this module decides what everything *leaving* the worker carries:

- :class:`FeaturePolicy` applies ``models.<m>.pii`` (feature name -> ``drop`` / ``hash`` /
  ``mask``) to echoed feature records, attributions and outgoing error text;
- :class:`OriginalPolicy` applies ``workers.dead_letter_original`` (``keep`` / ``encrypt`` /
  ``drop``) to a dead letter's original value, whether it travels inline or is offloaded to
  the object store; :func:`open_original` is the operator's way back.

``hash`` is a keyed HMAC-SHA256 (``workers.pii_hash_key``): stable, so equal values still join,
but without the key a dictionary of likely values cannot be hashed to reverse it. ``mask``
replaces a value by one fixed marker that tells nothing, not even its type or length.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import os
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.errors import SluicewayError

if TYPE_CHECKING:
    from pipeline.settings import Settings

Treatment = Literal["drop", "hash", "mask"]
OriginalMode = Literal["keep", "encrypt", "drop"]
FeatureValue = bool | int | float | str | None

MASKED = "<masked>"
"""What a masked value becomes, whatever it was."""
HASH_PREFIX = "hmac-sha256:"
HASH_HEX_CHARS = 32
"""128 bits of the MAC: collisions are out of reach, values stay short."""
REDACTED = "<redacted>"
"""What a PII value quoted in outgoing text (an error message) is replaced by."""
MIN_SCRUBBED_CHARS = 3
"""Renderings shorter than this are not scrubbed from text: they would mangle every number in
a message, and two characters identify nobody. Messages never quote values in the first place;
scrubbing is the second line, for text the worker does not write (a backend's error)."""

ORIGINAL_HEADER = "sluiceway-dlq-original"
"""Dead-letter header saying how the original value was treated: absent (kept as it was),
``encrypted;key_id=<id>``, or ``dropped``."""
ENVELOPE_MAGIC = b"SLWENC1"
NONCE_BYTES = 12
KEY_ID_CHARS = 16


class PrivacyError(SluicewayError):
    """A sealed original cannot be opened (wrong key, tampered, or not an envelope)."""


# ---------------------------------------------------------------------------- features


def canonical_bytes(value: bool | int | float | str) -> bytes:
    """The value as the bytes that are hashed: typed, so ``"1"`` and ``1`` differ, but a
    whole-number double and the same integer agree (``1.0`` and ``1``), so joins across
    producers that write numbers differently still match."""
    if isinstance(value, bool):
        return b"b:" + (b"true" if value else b"false")
    if isinstance(value, int):
        return b"n:" + str(value).encode()
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 2**63:
            return b"n:" + str(int(value)).encode()
        return b"n:" + repr(value).encode()
    return b"s:" + value.encode("utf-8", "surrogatepass")


def hash_value(value: bool | int | float | str, key: bytes) -> str:
    digest = hmac.new(key, canonical_bytes(value), hashlib.sha256).hexdigest()
    return HASH_PREFIX + digest[:HASH_HEX_CHARS]


def renderings(value: FeatureValue) -> set[str]:
    """Ways a value may be spelt in text: ``str``, ``repr``, short and float32 forms."""
    if value is None or isinstance(value, bool):
        return set()  # a flag identifies nobody, and "True" is in too many messages
    shown = {str(value), repr(value)}
    if isinstance(value, int | float):
        number = float(value)
        if math.isfinite(number):
            shown |= {f"{number:g}", repr(number), str(number)}
            if number.is_integer() and abs(number) < 2**63:
                shown.add(str(int(number)))
            # numpy prints a float32 row with its own shortest repr.
            shown.add(repr(float(np.float32(number))))
            shown.add(str(np.float32(number)))
    return {text for text in shown if len(text) >= MIN_SCRUBBED_CHARS}


@dataclass(frozen=True)
class FeaturePolicy:
    """One model's ``pii`` policy, ready to apply."""

    treatments: Mapping[str, Treatment] = field(default_factory=dict)
    hash_key: bytes | None = None

    def __post_init__(self) -> None:
        if "hash" in self.treatments.values() and not self.hash_key:
            raise ValueError("a hash treatment needs a hash key (workers.pii_hash_key)")

    @property
    def active(self) -> bool:
        return bool(self.treatments)

    def features(
        self, features: Mapping[str, FeatureValue] | None
    ) -> dict[str, FeatureValue] | None:
        """A feature record as it may leave: dropped names gone, the others hashed or masked;
        features without a treatment (and missing values) unchanged."""
        if features is None:
            return None
        if not self.treatments:
            return dict(features)
        shown: dict[str, FeatureValue] = {}
        for name, value in features.items():
            treatment = self.treatments.get(name)
            if treatment is None or (value is None and treatment != "drop"):
                shown[name] = value  # a missing value tells nothing
            elif treatment == "hash":
                assert self.hash_key is not None
                assert value is not None
                shown[name] = hash_value(value, self.hash_key)
            elif treatment == "mask":
                shown[name] = MASKED
            # drop: the name is left out as well
        return shown

    def may_explain(self, feature: str) -> bool:
        """Whether a feature's attribution may leave. No PII feature's may, whatever its
        treatment: a linear model's attribution is ``coef * (x - baseline) / scale`` with
        public weights, so the attribution gives the value back exactly."""
        return feature not in self.treatments

    def attributions(self, by_feature: Mapping[str, float]) -> dict[str, float]:
        return {name: value for name, value in by_feature.items() if self.may_explain(name)}

    def scrub(self, text: str, features: Mapping[str, FeatureValue] | None) -> str:
        """``text`` with every spelling of the request's PII values replaced: for outgoing
        error text that the worker did not write itself (a backend's message)."""
        if not self.treatments or not features or not text:
            return text
        return scrub_values(text, (features.get(name) for name in self.treatments))


def scrub_values(text: str, values: Iterable[FeatureValue]) -> str:
    """``text`` with every spelling of each of ``values`` replaced by :data:`REDACTED`."""
    spelt: set[str] = set()
    for value in values:
        spelt |= renderings(value)
    for shown in sorted(spelt, key=len, reverse=True):  # longest first: "1234.5" before "1234"
        text = text.replace(shown, REDACTED)
    return text


NO_POLICY = FeaturePolicy()


# ---------------------------------------------------------------------------- originals


def decode_key(text: str) -> bytes:
    """An AES key given as base64 (16, 24 or 32 bytes); raises ``ValueError`` otherwise."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64 (e.g. `openssl rand -base64 32`)") from None
    if len(key) not in (16, 24, 32):
        raise ValueError(f"must decode to 16, 24 or 32 bytes, not {len(key)}")
    return key


def key_id(key: bytes) -> str:
    """A key's public name: the start of its SHA-256 (a one-way fingerprint), recorded in
    each sealed letter so the operator knows which key opens it."""
    return hashlib.sha256(b"sluiceway-dlq-key:" + key).hexdigest()[:KEY_ID_CHARS]


def associated_data(topic: str, partition: int, offset: int) -> bytes:
    """What a sealed original is bound to: the record it came from, so an envelope moved to
    another letter (or to another offloaded object) fails to open."""
    return f"{topic}\x00{partition}\x00{offset}".encode("utf-8", "surrogatepass")


def seal(
    plaintext: bytes, key: bytes, aad: bytes, nonce: Callable[[int], bytes] = os.urandom
) -> bytes:
    """AES-GCM envelope: magic, key id length and key id, nonce, ciphertext with its tag."""
    name = key_id(key).encode()
    iv = nonce(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(iv, plaintext, aad)
    return ENVELOPE_MAGIC + bytes([len(name)]) + name + iv + sealed


def envelope_key_id(envelope: bytes) -> str:
    if not envelope.startswith(ENVELOPE_MAGIC) or len(envelope) <= len(ENVELOPE_MAGIC):
        raise PrivacyError("not a sealed original (no envelope marker)")
    size = envelope[len(ENVELOPE_MAGIC)]
    start = len(ENVELOPE_MAGIC) + 1
    if len(envelope) < start + size + NONCE_BYTES + 16:
        raise PrivacyError("sealed original is cut short")
    return envelope[start : start + size].decode("ascii", "replace")


def open_original(envelope: bytes, keys: Iterable[bytes], aad: bytes) -> bytes:
    """The original value inside ``envelope``; raises :class:`PrivacyError` when no key of
    ``keys`` is the one it names, or when the envelope (or what it is bound to) was altered."""
    wanted = envelope_key_id(envelope)
    key = next((k for k in keys if key_id(k) == wanted), None)
    if key is None:
        raise PrivacyError(f"sealed with key {wanted!r}, which is not among the keys given")
    start = len(ENVELOPE_MAGIC) + 1 + len(wanted)
    iv = envelope[start : start + NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(iv, envelope[start + NONCE_BYTES :], aad)
    except InvalidTag:
        raise PrivacyError(
            "sealed original does not open: altered, or not from this topic/partition/offset"
        ) from None


@dataclass(frozen=True)
class OriginalPolicy:
    """``workers.dead_letter_original``: what a dead letter carries of the original value."""

    mode: OriginalMode = "keep"
    key: bytes | None = None
    nonce: Callable[[int], bytes] = os.urandom

    def __post_init__(self) -> None:
        if self.mode == "encrypt" and not self.key:
            raise ValueError("encrypting dead-letter originals needs workers.dead_letter_key")

    def protect(
        self, value: bytes | None, topic: str, partition: int, offset: int
    ) -> tuple[bytes | None, list[tuple[str, bytes]]]:
        """The value the letter (or its offloaded object) may carry, and the header saying
        what was done to it."""
        if value is None or self.mode == "keep":
            return value, []
        if self.mode == "drop":
            return None, [(ORIGINAL_HEADER, b"dropped")]
        assert self.key is not None
        sealed = seal(value, self.key, associated_data(topic, partition, offset), self.nonce)
        return sealed, [(ORIGINAL_HEADER, f"encrypted;key_id={key_id(self.key)}".encode())]


KEEP_ORIGINALS = OriginalPolicy()


def configuration_problems(
    models: Mapping[str, Sequence[Treatment] | Iterable[Treatment]],
    *,
    dead_letter_original: OriginalMode,
    has_hash_key: bool,
) -> list[str]:
    """Why a worker serving ``models`` (name -> its treatments) must not start: a model with
    a PII policy whose dead letters would keep raw originals, or a ``hash`` without a key."""
    problems = []
    for name, treatments in models.items():
        used = set(treatments)
        if used and dead_letter_original == "keep":
            problems.append(
                f"model {name!r} has a pii policy, so its dead letters may not keep raw "
                "originals: set workers.dead_letter_original to 'encrypt' (with "
                "workers.dead_letter_key) or 'drop'"
            )
        if "hash" in used and not has_hash_key:
            problems.append(f"model {name!r} hashes features: set workers.pii_hash_key")
    return problems


# ---------------------------------------------------------------------------- logs


def code_trace(error: BaseException) -> str:
    """Where ``error`` came from, file by line, without its message or any local value:
    an unforeseen exception's message may quote the record that caused it."""
    frames = traceback.extract_tb(error.__traceback__)
    return " <- ".join(f"{f.filename}:{f.lineno} {f.name}" for f in reversed(frames))


def withheld(error: BaseException) -> str:
    """An unforeseen error as outgoing text: its type only, since its message may quote
    the record's values."""
    return f"{type(error).__name__} (message withheld: it may quote the record)"


def original_policy(settings: Settings) -> OriginalPolicy:
    """``workers.dead_letter_original`` with its key, ready to apply."""
    key = settings.workers.dead_letter_key
    return OriginalPolicy(
        settings.workers.dead_letter_original,
        None if key is None else decode_key(key.get_secret_value()),
    )
