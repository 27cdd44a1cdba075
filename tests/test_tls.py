"""TLS between trainer and teacher: `python -m teacher_server --ssl-certfile/--ssl-keyfile` serves HTTPS, the client
verifies it against `teacher.ca_file`, and a wrong CA or host name is a clear error at once (not a retry loop or
a 10-minute wait for a teacher that "is down"). Certificates are made by the test itself."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import sys
import time

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from student_trainer.teacher_client import TeacherClient, TeacherTLSError
from teacher_server.process import _server_process, free_port
from teacher_server.settings import Settings

pytestmark = pytest.mark.slow


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert, ip: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("aopd-teacher")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def write_pem(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(path)


@pytest.fixture(scope="module")
def https_teacher(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    ca_key, ca = make_ca("aopd test CA")
    _, other_ca = make_ca("someone else's CA")
    key, cert = make_server_cert(ca_key, ca, "127.0.0.1")
    files = {"ca": write_pem(d / "ca.pem", cert=ca), "other_ca": write_pem(d / "other.pem", cert=other_ca),
             "cert": write_pem(d / "cert.pem", cert=cert), "key": write_pem(d / "key.pem", key=key)}
    port = free_port()
    cmd = [sys.executable, "-m", "teacher_server", "--model", str(tiny_model_dir), "--port", str(port), "--dtype", "float32",
           "--max-top-k", "8", "--ssl-certfile", files["cert"], "--ssl-keyfile", files["key"], "--api-key", "k"]
    with _server_process(cmd, port, 180, scheme="https", verify=files["ca"]):
        yield {"url": f"https://127.0.0.1:{port}", "port": port, **files}


def test_the_client_verifies_the_teacher_against_its_ca(https_teacher):
    with TeacherClient(https_teacher["url"], ca_file=https_teacher["ca"], api_key="k") as c:
        info = c.connect()
        row = c.score([([2, 10, 11, 12], 1)], top_k=4)[0]
    assert info.vocab_size > 0 and row.token_logprobs.shape == (3,)
    # plain HTTP to the TLS port is not answered as HTTP
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{https_teacher['port']}/health", timeout=5).raise_for_status()


@pytest.mark.parametrize("case", ["wrong CA", "system store", "wrong host name"])
def test_an_unverifiable_certificate_is_a_clear_error_at_once(https_teacher, case):
    url, ca = https_teacher["url"], https_teacher["ca"]
    if case == "wrong CA":
        ca = https_teacher["other_ca"]
    elif case == "system store":
        ca = None
    else:
        url = f"https://localhost:{https_teacher['port']}"  # the certificate names 127.0.0.1 only
    t0 = time.monotonic()
    with TeacherClient(url, ca_file=ca, api_key="k", max_retries=8) as c:
        with pytest.raises(TeacherTLSError, match="teacher.ca_file") as err:
            c.info()
        with pytest.raises(TeacherTLSError):
            c.health()  # the trainer's start-up wait stops at once too
    assert time.monotonic() - t0 < 10, "retried"
    expected = "hostname mismatch" if case == "wrong host name" else "issuer certificate"  # OpenSSL's reasons
    assert expected in str(err.value).lower(), str(err.value)


def test_trainer_start_up_fails_fast_on_a_wrong_ca(https_teacher, tiny_model_dir, tmp_path):
    from student_trainer.config import load_config
    from student_trainer.train import train

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n')
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"teacher.url={https_teacher['url']}", "teacher.top_k=8",
                             f"teacher.ca_file={https_teacher['other_ca']}", "teacher.api_key=k",
                             f"data.train_path={data}", "data.apply_chat_template=false", "train.steps=1",
                             f"train.run_dir={tmp_path / 'run'}", "rollout.prompts_per_step=1"])
    t0 = time.monotonic()
    with pytest.raises(TeacherTLSError, match="teacher.ca_file"):
        train(cfg)
    assert time.monotonic() - t0 < 60


def test_a_key_over_plain_http_to_another_host_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="student_trainer.teacher_client"):
        TeacherClient("http://127.0.0.1:1", api_key="k").close()
        TeacherClient("http://localhost:1", api_key="k").close()
        TeacherClient("http://10.1.2.3:1").close()  # no key: nothing to leak
        assert not caplog.records
        TeacherClient("http://10.1.2.3:1", api_key="k").close()  # constructed only: nothing is sent
    assert "plain HTTP" in caplog.text and "10.1.2.3" in caplog.text
    with pytest.raises(ValueError, match="go together"):
        Settings(model="m", ssl_certfile="c.pem")
    with pytest.raises(ValueError, match="does not exist"):
        TeacherClient("https://127.0.0.1:1", ca_file="/nonexistent.pem")
