"""Fixtures shared by every test package.

S3: a real S3 API server (moto's ThreadedMotoServer) on loopback for the whole session. The
fixture exports the standard AWS settings a user would set in a shell (AWS_ENDPOINT_URL plus test
credentials), so the code under test and any Ray workers started afterwards reach it with no
special configuration.
"""

import logging
import uuid

import pytest

_S3_ENV_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                   "AWS_SECURITY_TOKEN", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Endpoint URL of a loopback S3 server; sets AWS_* in os.environ for the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    aws_dir = tmp_path_factory.mktemp("aws")
    (aws_dir / "config").write_text("")
    (aws_dir / "credentials").write_text("")
    with pytest.MonkeyPatch.context() as mp:
        for name in _S3_ENV_CLEARED:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_REGION", "us-east-1")
        # Keep a developer's ~/.aws out of it: no profile, endpoint or credentials from there.
        mp.setenv("AWS_CONFIG_FILE", str(aws_dir / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_dir / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def bucket(s3_server):
    """A fresh, empty bucket on the loopback S3 server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(bucket):
    """Alias of `bucket`."""
    return bucket
