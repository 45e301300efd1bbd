"""TLS to NATS: a service and a client verify the server against the CA they are given.

The certificates come from a throwaway CA made with the `openssl` CLI for
127.0.0.1; the server is a locked nats-server that requires TLS.
"""

from __future__ import annotations

import secrets
import shutil
import ssl
import subprocess

import pytest

from devstack import servers
from shared import bus, permissions
from shared.contract import ForgetReply, ForgetRequest
from tests.helpers import IDENTITIES, call, running

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """(ca.pem, server.pem, server.key) for 127.0.0.1, signed by a CA of this module."""
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=tiermem test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "1", "-extfile", "san.ext", "-out", "server.pem", cwd=d)
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.fixture(scope="module")
def tls_nats(tls_files, tmp_path_factory):
    ca, cert, key = tls_files
    passwords = {name: secrets.token_urlsafe(12) for name in permissions.ROLES}
    server = servers.start_nats(tmp_path_factory.mktemp("nats-tls"), die_with_parent=True,
                                users=permissions.nats_users(passwords), tls=(str(cert), str(key)))
    IDENTITIES[server.url] = passwords
    yield server.url, str(ca)
    IDENTITIES.pop(server.url, None)
    server.stop()


async def test_a_service_and_a_client_talk_over_verified_tls(tls_nats):
    url, ca = tls_nats
    assert url.startswith("tls://")

    async def build(rt):
        async def forget(req: ForgetRequest) -> ForgetReply:
            return ForgetReply(user_id=req.user_id, deleted=0)

        rt.endpoint("forget", "memory.forget", ForgetRequest, forget)

    passwords = IDENTITIES[url]
    env = {"NATS_URL": url, "NATS_TLS_CA": ca, "LOG_LEVEL": "warning"}
    async with running("l2-gateway", build, env):
        worker = bus.BusAuth(user=permissions.WORKER, password=passwords[permissions.WORKER], tls_ca=ca)
        nc = await bus.connect(url, worker, allow_reconnect=False)
        try:
            assert await call(nc, "memory.forget", {"user_id": "lead-1"}) == (
                200, {"user_id": "lead-1", "deleted": 0})
        finally:
            await nc.close()


async def test_a_client_that_cannot_verify_the_server_is_not_connected(tls_nats):
    url, _ = tls_nats
    passwords = IDENTITIES[url]
    unverified = bus.BusAuth(user=permissions.WORKER, password=passwords[permissions.WORKER])  # system CAs only
    with pytest.raises(ssl.SSLCertVerificationError):
        await bus.connect(url, unverified, allow_reconnect=False, connect_timeout=2)
