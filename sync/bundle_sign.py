"""Ed25519 signatures over a bundle's manifest (which holds every file's hash, so it covers every byte).

Keys are PEM files as ``openssl genpkey -algorithm ed25519`` and ``openssl pkey -pubout`` write them
(PKCS#8 private key, SubjectPublicKeyInfo public key); OpenSSH ``ssh-ed25519`` public keys work too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sync.bundle_parts import BundleError

ALGORITHM = "ed25519"


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """A short, stable name for a key in messages: sha256 of the raw public key, 16 hex digits."""
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise BundleError(f"--sign {path}: not a readable unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"--sign {path}: not an ed25519 key (make one: openssl genpkey -algorithm ed25519)")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
        key = (
            serialization.load_ssh_public_key(data) if data.startswith(b"ssh-")
            else serialization.load_pem_public_key(data)
        )
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BundleError(f"--trust {path}: not a readable PEM or OpenSSH public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"--trust {path}: not an ed25519 public key")
    return key


def sign(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    """The signature entry of a bundle: JSON naming the key and the signature over the manifest bytes."""
    doc = {
        "algorithm": ALGORITHM,
        "public_key": raw_public(key.public_key()).hex(),
        "signature": key.sign(manifest).hex(),
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


def check_signature(
    manifest: bytes, signature: bytes | None, trusted: list[Ed25519PublicKey], allow_untrusted: bool = False
) -> str | None:
    """Refuse a bundle whose signature is wrong, or (with keys trusted) missing or by another key, unless
    ``allow_untrusted`` (``--allow-unsigned``) accepts those two; a signature that does not match is refused always.

    Returns the signer's fingerprint, or None for an unsigned bundle.
    """
    if signature is None:
        if trusted and not allow_untrusted:
            raise BundleError("bundle is unsigned, but --trust keys are configured; refusing it "
                              "(pass --allow-unsigned to import it anyway)")
        return None
    try:
        doc = json.loads(signature)
        signer = Ed25519PublicKey.from_public_bytes(bytes.fromhex(doc["public_key"]))
        sig = bytes.fromhex(doc["signature"])
        if doc.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {doc.get('algorithm')!r}")
    except RecursionError:
        raise BundleError("bundle signature entry is malformed (nested too deeply); refusing it") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"bundle signature entry is malformed ({e}); refusing it") from None
    try:
        signer.verify(sig, manifest)
    except InvalidSignature:
        raise BundleError(
            f"bundle signature does not match its manifest (key {fingerprint(signer)}): altered; refusing it"
        ) from None
    if trusted and not allow_untrusted and raw_public(signer) not in {raw_public(k) for k in trusted}:
        raise BundleError(f"bundle is signed by key {fingerprint(signer)}, which is not among the --trust keys "
                          "(pass --allow-unsigned to import it anyway)")
    return fingerprint(signer)
