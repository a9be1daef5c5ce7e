#!/usr/bin/python3
"""msign — MSign request signing for musehubd (SPEC section 5), written from
the SPEC and RFC 9421 / RFC 9530 / RFC 8941 alone: it shares no code with the
C server, so each checks the other.  Needs only the standard library and
python3-cryptography (run with /usr/bin/python3).

A signed request carries

  Content-Digest:  sha-256=:<base64 SHA-256 of the body>:      (body only)
  Signature-Input: msign=("@method" "@path" "@query" "content-digest");created=<unix s>;keyid="<key id>";alg="ecdsa-p256-sha256";nonce="<random>"
  Signature:       msign=:<base64 of raw r||s, 64 bytes>:

where "content-digest" is left out of the covered list (and the header is not
sent) when the body is empty.  The signature is ECDSA P-256 with SHA-256 over
the RFC 9421 section 2.5 signature base:

  "@method": POST
  "@path": /owner/slug/fetch
  "@query": ?
  "content-digest": sha-256=:...:
  "@signature-params": ("@method" "@path" "@query" "content-digest");created=...;keyid="...";alg="ecdsa-p256-sha256"

A key id is "sha256:" + hex(SHA-256(DER SubjectPublicKeyInfo)) (SPEC 1).

The server accepts a state-changing request (any method but GET and HEAD,
except the fetch POST) once per signature base: sign() therefore adds a
random `nonce` parameter, so two identical requests sent in the same second
are two signatures, not a replay.  Signatures are low-S (s <= n/2): the
server refuses the other half.

Library
  sign(method, url, body, key_id, private_key, created=None) -> headers dict
  signer_from_files(key_id, pem_path) -> callable(method, url, body) -> headers
        (the `signer` that muse.Hub and muselib.Hub accept)
  key_id_of(public_key), load_private_key(pem), generate_key()
  signature_base(...), signature_params(...), content_digest(body)

Command line
  msign.py keygen PREFIX          writes PREFIX.key (private, PKCS#8 PEM, 0600)
                                  and PREFIX.pub (public, SPKI PEM); prints the key id
  msign.py keyid FILE             prints the key id of a PEM public or private key
  msign.py sign --key FILE METHOD URL [--body-file F] [--key-id ID]
                                  prints the signature headers

The URL must be given as it goes on the wire (already percent-encoded): the
path and query are signed byte for byte as they appear in it.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import sys
import time
import urllib.parse

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~2.5 ms)
if TYPE_CHECKING:
    from typing import Callable, Mapping

    Signer = Callable[[str, str, bytes], Mapping[str, str]]

LABEL = "msign"
ALG = "ecdsa-p256-sha256"
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # group order
COMPONENTS_BODY = ("@method", "@path", "@query", "content-digest")
COMPONENTS_NO_BODY = ("@method", "@path", "@query")


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------

def spki_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id_of(public_key: ec.EllipticCurvePublicKey) -> str:
    """SPEC 1: sha256: + hex(SHA-256(DER SubjectPublicKeyInfo))."""
    return "sha256:" + hashlib.sha256(spki_der(public_key)).hexdigest()


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("MSign keys are ECDSA P-256 (secp256r1)")
    return key


def load_any_public(pem: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of a PEM public or private key."""
    if b"PRIVATE KEY" in pem:
        return load_private_key(pem).public_key()
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("MSign keys are ECDSA P-256 (secp256r1)")
    return key


def generate_key() -> tuple[bytes, bytes, str]:
    """A fresh P-256 key pair: (private PEM (PKCS#8), public PEM (SPKI), key id)."""
    key = ec.generate_private_key(ec.SECP256R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return priv, pub, key_id_of(key.public_key())


# --------------------------------------------------------------------------
# RFC 8941 / 9421 / 9530 serialization
# --------------------------------------------------------------------------

def sf_string(s: str) -> str:
    """An RFC 8941 String: printable ASCII, with \\ and \" escaped."""
    if any(not (0x20 <= ord(c) <= 0x7E) for c in s):
        raise ValueError(f"not representable as a structured-field string: {s!r}")
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sf_bytes(b: bytes) -> str:
    return ":" + base64.b64encode(b).decode("ascii") + ":"


def content_digest(body: bytes) -> str:
    """RFC 9530 Content-Digest value with the sha-256 algorithm."""
    return "sha-256=" + sf_bytes(hashlib.sha256(body).digest())


def signature_params(components: tuple[str, ...], created: int, key_id: str,
                     alg: str = ALG, nonce: str | None = None) -> str:
    """The canonical inner list with parameters (the @signature-params value
    and the Signature-Input member value)."""
    inner = "(" + " ".join(sf_string(c) for c in components) + ")"
    params = f"{inner};created={int(created)};keyid={sf_string(key_id)};alg={sf_string(alg)}"
    return params + (f";nonce={sf_string(nonce)}" if nonce else "")


def split_url(url: str) -> tuple[str, str]:
    """(@path value, @query value) of a URL as sent (RFC 9421 2.2.6/2.2.7)."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    return path, "?" + parts.query


def signature_base(method: str, path: str, query: str, digest: str | None,
                   params: str) -> bytes:
    """RFC 9421 section 2.5: one line per covered component, then
    @signature-params, lines joined by LF, no trailing newline."""
    lines = [f'"@method": {method.upper()}', f'"@path": {path}', f'"@query": {query}']
    if digest is not None:
        lines.append(f'"content-digest": {digest}')
    lines.append(f'"@signature-params": {params}')
    base = "\n".join(lines)
    if "\r" in base or any("\n" in x for x in (method, path, query, digest or "")):
        raise ValueError("a covered component contains a line break")
    return base.encode("ascii")


def ecdsa_raw(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ecdsa-p256-sha256 (RFC 9421 3.3.4): raw r||s, 32 bytes each."""
    der = private_key.sign(data, ec.ECDSA(hashes.SHA256()))
    r, s = utils.decode_dss_signature(der)
    if s > P256_N // 2:  # low-S: (r, n - s) is the same signature's other half
        s = P256_N - s
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sign(method: str, url: str, body: bytes | None, key_id: str | None,
         private_key: ec.EllipticCurvePrivateKey, created: int | None = None,
         nonce: str | None = None) -> dict[str, str]:
    """The headers that sign one request per SPEC 5: Signature-Input,
    Signature and, when the body is not empty, Content-Digest.
    key_id None: computed from the key.  nonce None: a random one ("" for
    none: such a signature can be sent once)."""
    if key_id is None:
        key_id = key_id_of(private_key.public_key())
    body = bytes(body or b"")
    created = int(time.time()) if created is None else int(created)
    path, query = split_url(url)
    headers: dict[str, str] = {}
    digest = None
    if body:
        digest = content_digest(body)
        headers["Content-Digest"] = digest
        comps = COMPONENTS_BODY
    else:
        comps = COMPONENTS_NO_BODY
    if nonce is None:
        nonce = base64.urlsafe_b64encode(os.urandom(12)).decode("ascii")
    params = signature_params(comps, created, key_id, nonce=nonce or None)
    sig = ecdsa_raw(private_key, signature_base(method, path, query, digest, params))
    headers["Signature-Input"] = f"{LABEL}={params}"
    headers["Signature"] = f"{LABEL}={sf_bytes(sig)}"
    return headers


def signer_from_key(key_id: str | None, private_key: ec.EllipticCurvePrivateKey) -> Signer:
    """A muselib.Hub `signer`: (method, url, body) -> headers."""
    kid = key_id or key_id_of(private_key.public_key())

    def signer(method: str, url: str, body: bytes) -> Mapping[str, str]:
        return sign(method, url, body, kid, private_key)

    return signer


def signer_from_files(key_id: str | None, pem_path: str) -> Signer:
    """A muselib.Hub `signer` from a PEM private key file (key_id None:
    computed from the key)."""
    with open(pem_path, "rb") as fh:
        key = load_private_key(fh.read())
    return signer_from_key(key_id, key)


def add_signing_args(ap) -> None:
    """--key / --key-id (or $MUSE_KEY / $MUSE_KEY_ID): sign every API
    request with MSign (SPEC 5) using that P-256 private key (PEM)."""
    ap.add_argument("--key", default=os.environ.get("MUSE_KEY"), metavar="PEM",
                    help="private key (PEM, P-256) to sign requests with MSign ($MUSE_KEY); "
                         "without it requests are unsigned (anonymous, or the server's dev identity)")
    ap.add_argument("--key-id", default=os.environ.get("MUSE_KEY_ID"), metavar="ID",
                    help="key id registered on the server ($MUSE_KEY_ID; default: computed from the key)")


def hub_from_args(a, hub_module=None):
    """A Hub (muse.hub's, or hub_module's) for a.url, signing with a.key
    when given."""
    if hub_module is None:
        from . import hub as hub_module
    signer = signer_from_files(a.key_id, a.key) if a.key else None
    return hub_module.Hub(a.url, signer=signer)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _cmd_keygen(a: argparse.Namespace) -> int:
    priv, pub, kid = generate_key()
    fd = os.open(a.prefix + ".key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    with open(a.prefix + ".pub", "wb") as fh:
        fh.write(pub)
    print(kid)
    return 0


def _cmd_keyid(a: argparse.Namespace) -> int:
    with open(a.file, "rb") as fh:
        print(key_id_of(load_any_public(fh.read())))
    return 0


def _cmd_sign(a: argparse.Namespace) -> int:
    with open(a.key, "rb") as fh:
        key = load_private_key(fh.read())
    body = b""
    if a.body_file:
        with open(a.body_file, "rb") as fh:
            body = fh.read()
    for k, v in sign(a.method, a.url, body, a.key_id, key, a.created, a.nonce).items():
        print(f"{k}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="msign.py", description="MSign (SPEC 5) keys and request signatures")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("keygen", help="generate a P-256 key pair, print its key id")
    p.add_argument("prefix", help="writes PREFIX.key and PREFIX.pub")
    p.set_defaults(fn=_cmd_keygen)
    p = sub.add_parser("keyid", help="print the key id of a PEM key")
    p.add_argument("file")
    p.set_defaults(fn=_cmd_keyid)
    p = sub.add_parser("sign", help="print the headers signing one request")
    p.add_argument("--key", required=True, help="PEM private key file")
    p.add_argument("--key-id", default=None, help="default: computed from the key")
    p.add_argument("--body-file", default=None)
    p.add_argument("--created", type=int, default=None, help="unix seconds (default: now)")
    p.add_argument("--nonce", default=None, help="nonce parameter (default: random; '' for none)")
    p.add_argument("method")
    p.add_argument("url")
    p.set_defaults(fn=_cmd_sign)
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except (OSError, ValueError) as e:
        print(f"msign.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
