import logging
import os

import pytest


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A real local Ray for the session (2 CPUs, as on CI). Started after the S3 server so its
    workers inherit AWS_ENDPOINT_URL and the test credentials, like a user's shell would pass them."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, object_store_memory=512 << 20, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()
