"""Fixtures (a pytest plugin, loaded by tests/conftest.py) for the object-storage tests: a real
S3-protocol server (moto's standalone server on a free loopback port, reached through s3fs like a
real bucket; no client is mocked), a fresh bucket per test and a fault-injecting proxy.

Credentials are fake and come from the environment, as they would in production; the endpoint
comes through ``storage_options`` (what a user passes to ``CheckpointManager``).
"""

from __future__ import annotations

import uuid

import pytest

from s3_server import S3Server, start_s3_server


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch) -> str:
    """A fresh, empty bucket per test (its name)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    yield name


@pytest.fixture
def s3_options(s3_server: S3Server) -> dict:
    """The ``storage_options`` that point s3fs at the test server (no credentials in them)."""
    return s3_server.storage_options()


@pytest.fixture
def fault_proxy(s3_server: S3Server):
    """A fault-injecting proxy in front of the server (``fault_proxy.endpoint``)."""
    from fault_proxy import FaultProxy

    proxy = FaultProxy(s3_server.endpoint)
    yield proxy
    proxy.close()


@pytest.fixture
def proxied_options(s3_server: S3Server, fault_proxy) -> dict:
    """``storage_options`` through the fault proxy, with short botocore timeouts."""
    options = s3_server.storage_options(fault_proxy.endpoint)
    options["config_kwargs"] = {
        "connect_timeout": 5,
        "read_timeout": 10,
        "retries": {"max_attempts": 4, "mode": "standard"},
    }
    return options
