"""A local S3 for tests: moto's ThreadedMotoServer on 127.0.0.1 with a free port, started in this process once per
test module, emptied before each test; the test sees AWS_ENDPOINT_URL and dummy credentials (the standard places a
user's S3 settings come from), and a bucket `feat`. Nothing leaves the machine.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

BUCKET = "feat"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.moto_server.threaded_moto_server")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(s3_endpoint, monkeypatch) -> Iterator[str]:
    """An empty `feat` bucket on the local server; returns the endpoint URL. Environment restored afterwards."""
    import boto3
    import requests
    import s3fs

    requests.post(f"{s3_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    for key, value in (S3_ENV | {"AWS_ENDPOINT_URL": s3_endpoint}).items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    yield s3_endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    from pipe_align.extract.remote import set_storage_options

    set_storage_options({})


def s3_keys(endpoint: str, prefix: str = "") -> list[str]:
    """Every object key in the bucket under `prefix` (read with boto3, independently of the code under test)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    keys, token = [], None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix} | ({"ContinuationToken": token} if token else {})
        page = client.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return sorted(keys)
