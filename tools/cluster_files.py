"""The node types of the cluster files, rendered from ``sane_ray/cluster_types.py``: ``python tools/cluster_files.py``.

Rewrites the ``available_node_types`` block of ``cluster/aws.yaml`` (the rest of the file, its
comments included, is kept as written), so the AWS types cannot drift from the one definition;
``tests/test_cluster_files.py`` fails when the file differs from :func:`render_aws`. With
``--fake-cluster FILE --gcs-address IP:PORT`` it writes the same types scaled down to this
machine, for ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=FILE`` (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, wherever the script is run from

from sane_ray.cluster_types import NODE_TYPES, NodeType, aws_node_config, fake_cluster_config  # noqa: E402

AWS = ROOT / "cluster" / "aws.yaml"
# The block runs from its key to the next top-level key.
BLOCK = re.compile(r"^available_node_types:.*?(?=^\S)", re.MULTILINE | re.DOTALL)


def flow(value: object) -> str:
    """``value`` as one line of YAML flow style."""
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()


def _type_lines(t: NodeType) -> list[str]:
    read = "GPUs, CPUs" if t.gpus else "CPUs"
    size = f"{t.cpus} vCPU, {t.memory_gib} GiB" + (f", {t.gpus}x {t.accelerator}" if t.gpus else "")
    node = aws_node_config(t)
    return [
        f"  {t.name}:  # {t.role}",
        f"    resources: {flow(t.resources())}" + ("" if t.is_head else f"  # {read} and memory are read from the instance type"),
        f"    min_workers: {t.min_workers}",
        f"    max_workers: {t.max_workers}",
        "    node_config:",
        f"      InstanceType: {t.instance_type}  # {size}",
        f"      ImageId: {node['ImageId']}  # sane_ray.cluster_types.AMI: set your region's there",
        f"      IamInstanceProfile: {flow(node['IamInstanceProfile'])}",
        "      BlockDeviceMappings:",
        *(f"        - {flow(d)}" for d in node["BlockDeviceMappings"]),
    ]


def render_aws(text: str) -> str:
    """``text`` (cluster/aws.yaml) with its ``available_node_types`` block rendered from NODE_TYPES."""
    lines = ["available_node_types:  # rendered from sane_ray/cluster_types.py by tools/cluster_files.py: edit there"]
    for t in NODE_TYPES:
        lines += _type_lines(t)
    new, n = BLOCK.subn("\n".join(lines) + "\n\n", text, count=1)
    if n != 1:
        raise ValueError(f"{AWS}: no top-level available_node_types block to render")
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fake-cluster", metavar="FILE", help="write the types scaled to this machine to FILE")
    parser.add_argument("--gcs-address", metavar="IP:PORT", help="the head of the fake cluster (with --fake-cluster)")
    parser.add_argument("--idle-timeout-minutes", type=float, default=0.2)
    args = parser.parse_args(argv)
    if args.fake_cluster:
        if not args.gcs_address:
            parser.error("--fake-cluster needs --gcs-address IP:PORT (the port given to ray start --head)")
        cfg = fake_cluster_config(args.gcs_address, args.idle_timeout_minutes)
        Path(args.fake_cluster).write_text(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    AWS.write_text(render_aws(AWS.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
