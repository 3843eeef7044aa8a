"""Compaction items: a conversation (IR items) packed losslessly into one opaque, tenant-bound `encrypted_content`.

Format of `encrypted_content` (base64url, no padding):

    version (1 byte, 0x01) | salt (16 bytes) | nonce (12 bytes) | AES-256-GCM ciphertext + 16-byte tag

The plaintext is the items as JSON, zlib-compressed. The AES key is derived per item with HKDF-SHA256 from the
router's compaction key, the random salt and the tenant id (in HKDF `info`), and the tenant id is also the GCM
associated data: another tenant's key differs and its associated data differs, so a tenant can neither read nor
forge another tenant's item, and any modified byte fails authentication. A fresh salt per item gives every item
its own key, so random nonces never meet twice under one key.

Key source: `server.compaction_key` in the config, a secret of at least 16 bytes written as hex or base64. On AWS
it comes from Secrets Manager like the provider keys (`UNBROKEN_SECRETS` puts it in the environment; the config says
`compaction_key: ${UNBROKEN_COMPACTION_KEY}`). Without one, each process draws a random key: items then stop
opening after a restart or on another Lambda instance (fine for `unbroken serve` on a laptop, logged as a warning).

`cryptography` is imported on first use only (cold start).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import secrets
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import lru_cache
from typing import Any

from unbroken.errors import Failure, invalid
from unbroken.ir import FunctionCall, FunctionCallOutput, ImagePart, Item, Message, Reasoning, TextPart

log = logging.getLogger("unbroken.compaction")

VERSION = 1
_SALT = 16
_NONCE = 12
_TAG = 16
_HEADER = 1 + _SALT + _NONCE
_INFO = b"unbroken/compaction/v1\x00"
MIN_KEY_BYTES = 16
# Larger than any request the router accepts can hold; bounds decompression of an (authenticated) item.
MAX_PLAINTEXT_BYTES = 64 * 1024 * 1024
_HEX = re.compile(r"^[0-9a-fA-F]+$")


class CompactionError(ValueError):
    """An item that does not open: not made by this router for this tenant, modified, or malformed."""


def parse_key(secret: str) -> bytes:
    """The key bytes of a configured secret: hex if it is all hex digits (even length), else base64 (standard or
    URL-safe, padding optional). Raises ValueError for anything shorter than 16 bytes."""
    text = secret.strip()
    if _HEX.match(text) and len(text) % 2 == 0:
        raw = bytes.fromhex(text)
    else:
        try:
            raw = base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4),
                                   validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("compaction_key must be hex or base64") from None
    if len(raw) < MIN_KEY_BYTES:
        raise ValueError(f"compaction_key must hold at least {MIN_KEY_BYTES} bytes (got {len(raw)})")
    return raw


# -- items <-> JSON ------------------------------------------------------------------------------------------------


def items_to_json(items: Sequence[Item]) -> list[dict[str, Any]]:
    return [asdict(item) for item in items]


def _part(data: dict[str, Any]) -> TextPart | ImagePart:
    if data["type"] == "text":
        return TextPart(str(data["text"]))
    if data["type"] == "image":
        return ImagePart(str(data["url"]), str(data["detail"]))
    raise CompactionError(f"unknown content part {data['type']!r}")


def items_from_json(data: Any) -> list[Item]:
    if not isinstance(data, list):
        raise CompactionError("compaction payload is not a list of items")
    items: list[Item] = []
    try:
        for d in data:
            kind = d["type"]
            if kind == "message":
                items.append(Message(d["role"], [_part(p) for p in d["content"]]))
            elif kind == "function_call":
                items.append(FunctionCall(d["call_id"], d["name"], d["arguments"]))
            elif kind == "function_call_output":
                items.append(FunctionCallOutput(d["call_id"], d["output"]))
            elif kind == "reasoning":
                items.append(Reasoning(text=d["text"], summary=list(d["summary"]),
                                       encrypted_content=d["encrypted_content"], signature=d["signature"],
                                       provider=d["provider"]))
            else:
                raise CompactionError(f"unknown item type {kind!r}")
    except (KeyError, TypeError) as exc:
        raise CompactionError(f"malformed compaction payload: {exc!r}") from None
    return items


# -- sealing -------------------------------------------------------------------------------------------------------


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise CompactionError("encrypted_content is not base64url") from None


class CompactionCodec:
    """Seals and opens compaction items under one master key."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) < MIN_KEY_BYTES:
            raise ValueError(f"the compaction key must hold at least {MIN_KEY_BYTES} bytes")
        self._master = master_key

    def _aead(self, tenant: str, salt: bytes) -> Any:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO + tenant.encode()).derive(self._master)
        return AESGCM(key)

    @staticmethod
    def _aad(tenant: str) -> bytes:
        return bytes([VERSION]) + tenant.encode()

    def seal(self, tenant: str, items: Sequence[Item]) -> str:
        plaintext = zlib.compress(json.dumps(items_to_json(items), ensure_ascii=False,
                                             separators=(",", ":")).encode(), 6)
        salt, nonce = secrets.token_bytes(_SALT), secrets.token_bytes(_NONCE)
        sealed = self._aead(tenant, salt).encrypt(nonce, plaintext, self._aad(tenant))
        return _b64encode(bytes([VERSION]) + salt + nonce + sealed)

    def open(self, tenant: str, token: str) -> list[Item]:
        from cryptography.exceptions import InvalidTag

        raw = _b64decode(token)
        if len(raw) < _HEADER + _TAG or raw[0] != VERSION:
            raise CompactionError("encrypted_content is not a compaction item of this router")
        salt, nonce, sealed = raw[1:1 + _SALT], raw[1 + _SALT:_HEADER], raw[_HEADER:]
        try:
            compressed = self._aead(tenant, salt).decrypt(nonce, sealed, self._aad(tenant))
        except InvalidTag:
            raise CompactionError("encrypted_content does not authenticate for this caller") from None
        inflater = zlib.decompressobj()
        try:
            plaintext = inflater.decompress(compressed, MAX_PLAINTEXT_BYTES)
        except zlib.error:
            raise CompactionError("compaction payload does not decompress") from None
        if inflater.unconsumed_tail:
            raise CompactionError("compaction payload is too large")
        try:
            data = json.loads(plaintext)
        except ValueError:
            raise CompactionError("compaction payload is not JSON") from None
        return items_from_json(data)


@lru_cache(maxsize=8)
def codec_for(secret: str | None) -> CompactionCodec:
    """The codec for a configured secret, or, without one, a random key kept for the life of the process."""
    if secret:
        return CompactionCodec(parse_key(secret))
    log.warning("no server.compaction_key configured: compaction items are sealed with a per-process random key "
                "and will not open after a restart or on another instance")
    return CompactionCodec(secrets.token_bytes(32))


def compaction_codec(secret: str | None) -> CompactionCodec:
    """`codec_for`, with a bad configured key as the operator's failure (the message names the setting, never the
    key)."""
    try:
        return codec_for(secret)
    except ValueError as exc:
        raise Failure("internal", f"Compaction is misconfigured: {exc}.", code="server_error") from None


def expand_compaction_for(tenant: str, secret: str | None) -> Callable[[str, str], list[Item]]:
    """The `expand_compaction` callable of the request pipeline: a compaction item made for `tenant` becomes the
    items it holds; anything else (another tenant's item, a modified one) is a 400 naming the item."""

    def expand(encrypted_content: str, param: str) -> list[Item]:
        try:
            return compaction_codec(secret).open(tenant, encrypted_content)
        except CompactionError:
            raise invalid("The compaction item could not be opened: it was not made by this "
                          "router for this caller, or it was modified.", param=f"{param}.encrypted_content",
                          code="invalid_encrypted_content") from None

    return expand
