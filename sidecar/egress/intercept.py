"""Leaf certificates for intercepted hosts, signed on the fly by the configured CA and cached.

One leaf key (EC P-256) serves every host, as mitmproxy does: the private key never leaves the
process, and a new host costs one signature (about a millisecond), not a key generation. Each
host's server ``SSLContext`` is kept in a bounded LRU cache and rebuilt before its certificate
expires. ALPN offers only ``http/1.1``: the decrypted stream is served by the HTTP/1.1 listener.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LEAF_DAYS = 30
RENEW_BEFORE_S = 24 * 3600.0
MAX_CACHED = 512
IssuerKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)


class CertificateAuthority:
    """The interception CA: signs and caches one server context per intercepted host."""

    def __init__(
        self, cert_pem: bytes, key_pem: bytes, clock: Callable[[], float] = time.time
    ) -> None:
        self.cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, IssuerKey):
            raise ValueError(f"unsupported CA key type: {type(key).__name__}")
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != self.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ValueError("intercept.ca_key does not belong to intercept.ca_cert")
        self.key: IssuerKey = key
        self._cert_pem = cert_pem
        self._clock = clock
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._contexts: OrderedDict[str, tuple[float, ssl.SSLContext]] = OrderedDict()
        self.issued = 0

    @classmethod
    def from_files(cls, cert_path: str, key_path: str) -> CertificateAuthority:
        return cls(Path(cert_path).read_bytes(), Path(key_path).read_bytes())

    def __repr__(self) -> str:
        subject = self.cert.subject.rfc4514_string()
        return f"<CertificateAuthority {subject} cached={len(self._contexts)} issued={self.issued}>"

    def context_for(self, host: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a certificate for ``host``."""
        now = self._clock()
        cached = self._contexts.get(host)
        if cached is not None and cached[0] - RENEW_BEFORE_S > now:
            self._contexts.move_to_end(host)
            return cached[1]
        expires, context = self._build(host, now)
        self._contexts[host] = (expires, context)
        self._contexts.move_to_end(host)
        while len(self._contexts) > MAX_CACHED:
            self._contexts.popitem(last=False)
        return context

    def leaf_certificate(self, host: str, now: float) -> x509.Certificate:
        """A certificate for ``host`` (DNS name or IP address) signed by this CA."""
        start = datetime.datetime.fromtimestamp(now, datetime.UTC)
        end = min(start + datetime.timedelta(days=LEAF_DAYS), self.cert.not_valid_after_utc)
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        ca_public = self.key.public_key()
        algorithm = (
            None
            if isinstance(self.key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
            else hashes.SHA256()
        )
        self.issued += 1
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - datetime.timedelta(hours=1))
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._leaf_key.public_key()), False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public),
                critical=False,
            )
            .sign(self.key, algorithm)
        )

    def _build(self, host: str, now: float) -> tuple[float, ssl.SSLContext]:
        cert = self.leaf_certificate(host, now)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        chain = cert.public_bytes(serialization.Encoding.PEM) + self._cert_pem
        # ssl loads certificates only from files: write them to a private temporary directory
        # that exists for the duration of this call.
        with tempfile.TemporaryDirectory(prefix="llm-sidecar-leaf-") as folder:
            chain_path, key_path = Path(folder, "chain.pem"), Path(folder, "key.pem")
            chain_path.write_bytes(chain)
            key_path.touch(mode=0o600)
            key_path.write_bytes(self._leaf_key_pem)
            context.load_cert_chain(chain_path, key_path)
        return cert.not_valid_after_utc.timestamp(), context
