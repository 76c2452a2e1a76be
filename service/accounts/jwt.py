"""NATS JWTs (v2 claims) and nkeys: encode, decode and verify operator, account and user JWTs.

A NATS JWT is `base64url(header).base64url(claims).base64url(signature)` without padding; the
header is `{"typ":"JWT","alg":"ed25519-nkey"}`, the signature is the issuer nkey's ed25519
signature of the first two parts, and `jti` is the base32 SHA-256 of the claims without `jti`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Collection, Mapping
from typing import Any

import nkeys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
UNLIMITED = -1
# Every NATS limit an account JWT carries: a limit left out counts as zero for nats-server.
NATS_LIMITS: dict[str, Any] = {
    "subs": UNLIMITED,
    "data": UNLIMITED,
    "payload": UNLIMITED,
    "imports": UNLIMITED,
    "exports": UNLIMITED,
    "wildcards": True,
    "conn": UNLIMITED,
    "leaf": UNLIMITED,
}
JETSTREAM_LIMITS: dict[str, Any] = {
    "mem_storage": UNLIMITED,
    "disk_storage": UNLIMITED,
    "streams": UNLIMITED,
    "consumer": UNLIMITED,
}
USER_LIMITS: dict[str, Any] = {"subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED}

_PREFIXES = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}
_ROLE_OF_LETTER = {"O": "operator", "A": "account", "U": "user"}


class JwtError(Exception):
    """A JWT that is malformed, badly signed, or not signed by a trusted key."""


# --- keys ------------------------------------------------------------------------------------


def new_key(role: str) -> Any:
    """A fresh nkey pair for `role` (operator, account or user)."""
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), _PREFIXES[role]))


def from_seed(seed: str | bytes) -> Any:
    """The nkey pair of a seed (`S...`)."""
    raw = seed.encode() if isinstance(seed, str) else seed
    try:
        return nkeys.from_seed(bytearray(raw.strip()))
    except (nkeys.NkeysError, binascii.Error, ValueError) as exc:
        raise JwtError(f"not an nkey seed: {exc}") from None


def read_seed(path: str) -> Any:
    """The nkey pair of the first seed found in a file (a bare seed or a creds file)."""
    with open(path) as f:
        for line in f:
            if line.strip().startswith("S") and len(line.strip()) >= 58:
                return from_seed(line.strip())
    raise JwtError(f"no nkey seed in {path}")


def public_key(kp: Any) -> str:
    """The public key (`O...`, `A...`, `U...`) of a key pair."""
    return bytes(kp.public_key).decode()


def seed_of(kp: Any) -> str:
    """The seed (`S...`) of a key pair."""
    return bytes(kp.seed).decode()


def role_of(key: str) -> str | None:
    """`operator`, `account` or `user` for a public nkey, None when it is none of them."""
    try:
        _raw_public(key)
    except JwtError:
        return None
    return _ROLE_OF_LETTER.get(key[:1])


def is_account_key(key: str) -> bool:
    """True when `key` is a valid account public key."""
    return role_of(key) == "account"


def _raw_public(key: str) -> bytes:
    try:
        data = base64.b32decode(key + "=" * (-len(key) % 8))
    except (binascii.Error, ValueError):
        raise JwtError(f"not a public nkey: {key!r}") from None
    body, crc = data[:-2], data[-2:]
    if len(body) != 33 or nkeys.crc16_checksum(body) != crc or body[0] not in _PREFIXES.values():
        raise JwtError(f"not a public nkey: {key!r}")
    return body[1:]


# --- JWTs ------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def encode(claims: Mapping[str, Any], signer: Any) -> str:
    """Sign `claims` with `signer`: sets `iss`, `iat` (when missing) and `jti`, returns the JWT."""
    body = {k: v for k, v in claims.items() if k != "jti"}
    body["iss"] = public_key(signer)
    body.setdefault("iat", int(time.time()))
    body = {"jti": base64.b32encode(hashlib.sha256(_json(body)).digest()).decode().rstrip("="), **body}
    signed = f"{_b64(_json(HEADER))}.{_b64(_json(body))}"
    return f"{signed}.{_b64(signer.sign(signed.encode()))}"


def decode(token: str) -> dict[str, Any]:
    """The claims of a JWT, without checking its signature."""
    try:
        _, payload, _ = token.strip().split(".")
        claims = json.loads(_unb64(payload))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise JwtError("not a NATS JWT") from None
    if not isinstance(claims, dict):
        raise JwtError("JWT claims are not an object")
    return claims


def verify(token: str, trusted: Collection[str]) -> dict[str, Any]:
    """The claims of a JWT whose signature is valid and whose issuer is in `trusted`."""
    claims = decode(token)
    header_b64, payload_b64, signature_b64 = token.strip().split(".")
    try:
        header = json.loads(_unb64(header_b64))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise JwtError("JWT header is not JSON") from None
    if header != HEADER:
        raise JwtError(f"JWT header must be {HEADER}, not {header}")
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or issuer not in trusted:
        raise JwtError(f"JWT issuer {issuer!r} is not a trusted operator key")
    try:
        Ed25519PublicKey.from_public_bytes(_raw_public(issuer)).verify(
            _unb64(signature_b64), f"{header_b64}.{payload_b64}".encode()
        )
    except (InvalidSignature, binascii.Error, ValueError):
        raise JwtError("JWT signature does not match its issuer") from None
    return claims


# --- claims ----------------------------------------------------------------------------------


def operator_claims(
    subject: str, name: str, *, signing_keys: list[str], system_account: str
) -> dict[str, Any]:
    """Claims of an operator JWT (self-signed by its identity key)."""
    return {
        "sub": subject,
        "name": name,
        "nats": {
            "signing_keys": signing_keys,
            "system_account": system_account,
            "type": "operator",
            "version": 2,
        },
    }


def account_claims(
    subject: str,
    name: str,
    *,
    jetstream: bool = False,
    exports: list[dict[str, Any]] | None = None,
    imports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Claims of an account JWT with every limit written out (unlimited; JetStream when asked)."""
    nats: dict[str, Any] = {
        "limits": {**NATS_LIMITS, **(JETSTREAM_LIMITS if jetstream else {})},
        "default_permissions": {"pub": {}, "sub": {}},
        "type": "account",
        "version": 2,
    }
    if exports:
        nats["exports"] = exports
    if imports:
        nats["imports"] = imports
    return {"sub": subject, "name": name, "nats": nats}


def user_claims(subject: str, name: str) -> dict[str, Any]:
    """Claims of a user JWT without limits or permissions (signed by its account key)."""
    return {
        "sub": subject,
        "name": name,
        "nats": {"pub": {}, "sub": {}, **USER_LIMITS, "type": "user", "version": 2},
    }


def account_of_creds(path: str) -> str:
    """The account (public key) of the user a `.creds` file holds: its JWT's issuer account, or
    its issuer when the account key itself signed it."""
    with open(path) as f:
        text = f.read()
    for line in text.splitlines():
        if line.count(".") == 2 and line.startswith("ey"):
            claims = decode(line)
            account = (claims.get("nats") or {}).get("issuer_account") or claims.get("iss")
            if isinstance(account, str) and is_account_key(account):
                return account
    raise JwtError(f"no user JWT of an account in {path}")


def creds(user_jwt: str, user_seed: str) -> str:
    """The text of a `.creds` file: a user JWT and its nkey seed."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )
