"""``llm-sidecar gen-ca DIR``: create the CA key pair that signs interception certificates.

The CA is for one deployment only: its key lets whoever holds it impersonate any host to the
apps that trust it, so it is written with mode 0600 and should live in a Kubernetes Secret.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_FILE = "ca.pem"
KEY_FILE = "ca-key.pem"


def generate_ca(
    directory: str | Path,
    *,
    common_name: str = "llm-sidecar interception CA",
    days: int = 3650,
    force: bool = False,
) -> tuple[Path, Path]:
    """Write ``ca.pem`` and ``ca-key.pem`` (EC P-256) into ``directory``; return their paths.

    Refuses to overwrite existing files unless ``force``: replacing a CA silently would break
    every app that trusts the old one.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    if not force:
        for path in (cert_path, key_path):
            if path.exists():
                raise FileExistsError(f"{path} exists (use --force to replace it)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llm-sidecar"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_bytes)
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def gen_ca_command(directory: str, *, days: int, force: bool) -> int:
    """``llm-sidecar gen-ca DIR``: write the pair and tell how to use it."""
    try:
        cert_path, key_path = generate_ca(directory, days=days, force=force)
    except (FileExistsError, OSError) as exc:
        print(f"llm-sidecar gen-ca: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {cert_path} (CA certificate: give it to the apps)\n"
        f"wrote {key_path} (CA private key, mode 0600: give it only to the sidecar)\n\n"
        "sidecar config:\n"
        "  intercept:\n"
        "    hosts: [api.openai.com]\n"
        f"    ca_cert: {cert_path}\n"
        f"    ca_key: {key_path}\n\n"
        "app environment (trust the CA; see docs/EGRESS.md):\n"
        f"  SSL_CERT_FILE={cert_path}        # Python ssl, httpx, openai, anthropic\n"
        f"  REQUESTS_CA_BUNDLE={cert_path}   # requests\n"
        f"  NODE_EXTRA_CA_CERTS={cert_path}  # Node.js\n"
        "(SSL_CERT_FILE and REQUESTS_CA_BUNDLE replace the system store: point them at a\n"
        " bundle holding the system CAs plus this one if the app also reaches other hosts.)"
    )
    return 0
