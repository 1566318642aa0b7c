"""The interception CA: gen-ca output, leaf certificates, and a real TLS handshake in memory."""

from __future__ import annotations

import os
import ssl
import stat
import time

import pytest
from cryptography import x509

from sidecar.cli import main
from sidecar.egress.ca import generate_ca
from sidecar.egress.intercept import CertificateAuthority


@pytest.fixture
def ca_files(tmp_path):
    cert, key = generate_ca(tmp_path / "ca")
    return cert, key


def test_gen_ca_writes_a_ca_and_a_private_key(tmp_path, capsys):
    assert main(["gen-ca", str(tmp_path / "out")]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "out" / "ca.pem").read_bytes())
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    mode = stat.S_IMODE(os.stat(tmp_path / "out" / "ca-key.pem").st_mode)
    assert mode == 0o600
    assert "SSL_CERT_FILE" in capsys.readouterr().out
    assert main(["gen-ca", str(tmp_path / "out")]) == 1  # never overwritten silently
    assert main(["gen-ca", str(tmp_path / "out"), "--force"]) == 0


def test_leaf_certificates_are_signed_for_the_host_and_cached(ca_files):
    cert, key = ca_files
    ca = CertificateAuthority.from_files(str(cert), str(key))
    leaf = ca.leaf_certificate("api.openai.com", time.time())
    leaf.verify_directly_issued_by(ca.cert)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["api.openai.com"]
    ip_leaf = ca.leaf_certificate("127.0.0.1", time.time())
    ip_names = ip_leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in ip_names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    first = ca.context_for("api.openai.com")
    assert ca.context_for("api.openai.com") is first
    assert ca.issued == 3


def test_expiring_leaf_is_renewed(ca_files):
    cert, key = ca_files
    now = [time.time()]
    ca = CertificateAuthority(cert.read_bytes(), key.read_bytes(), clock=lambda: now[0])
    first = ca.context_for("h.test")
    now[0] += 29.5 * 86400  # within a day of the 30-day leaf's end
    assert ca.context_for("h.test") is not first


def test_mismatched_key_is_refused(tmp_path):
    cert, _ = generate_ca(tmp_path / "a")
    _, other_key = generate_ca(tmp_path / "b")
    with pytest.raises(ValueError, match="does not belong"):
        CertificateAuthority.from_files(str(cert), str(other_key))


def test_a_client_trusting_the_ca_completes_a_handshake(ca_files):
    cert, key = ca_files
    server_ctx = CertificateAuthority.from_files(str(cert), str(key)).context_for("api.openai.com")
    client_ctx = ssl.create_default_context(cafile=str(cert))
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="api.openai.com")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    client.do_handshake()
    assert client.selected_alpn_protocol() == "http/1.1"  # the listener speaks HTTP/1.1 only
    wrong = ssl.create_default_context(cafile=str(cert)).wrap_bio(
        ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="api.anthropic.com"
    )
    assert wrong is not None
