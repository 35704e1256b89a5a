"""Shared test fixtures: one local S3 endpoint (moto over real HTTP) and one Ray cluster per session.

The S3 server starts first and exports the AWS variables, so Ray workers started
afterwards inherit the endpoint and credentials exactly as on a real cluster.
"""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with the AWS_* variables pointing at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"endpoint": endpoint, **env}
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3(s3_server):
    """A fresh, empty bucket on the session's S3 server: ``{"endpoint", "bucket", ...}``."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint"]).create_bucket(Bucket=bucket)
    return {**s3_server, "bucket": bucket}


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the whole session (logical CPUs oversubscribed on purpose:
    Train workers + Data actors must fit at once on a 2-core machine). Its dashboard runs
    on a free port, where this cluster's State API is (Tune's ASHA needs it)."""
    import ray

    from sane_ray.cluster import free_port, point_state_api_at

    port = free_port()
    point_state_api_at(port)  # Tune trials stopped by ASHA need the State API of this cluster
    ctx = ray.init(
        address="local",  # never join another cluster running on this machine
        num_cpus=6,
        object_store_memory=300 * 1024**2,
        include_dashboard=True,
        dashboard_port=port,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ctx
    ray.shutdown()
