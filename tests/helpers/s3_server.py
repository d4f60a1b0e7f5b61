"""Start moto's standalone S3 server on a free 127.0.0.1 port (tests and benchmarks).

The server is a real HTTP server in its own process, so a test can SIGKILL a client mid-upload and
the objects that were or were not completed stay as an S3 store would leave them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from ports import free_port

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3Server:
    """A running moto server: its endpoint, the fake credentials' environment, and the process."""

    endpoint: str
    proc: subprocess.Popen
    env: dict = field(default_factory=lambda: dict(FAKE_ENV))

    def storage_options(self, endpoint: str | None = None) -> dict:
        return {"client_kwargs": {"endpoint_url": endpoint or self.endpoint}}

    def client(self, endpoint: str | None = None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_s3_server(timeout: float = 60.0) -> S3Server:
    """Start ``python -m moto.server`` on a free loopback port and wait until it answers."""
    port = free_port()
    env = {**os.environ, **FAKE_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
            break
        except OSError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint} (exit status {proc.poll()})") from exc
            time.sleep(0.1)
    return S3Server(endpoint, proc)
