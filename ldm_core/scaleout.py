"""The launch flags of the optional Ray pool (`--ray-address`, `--ray-local`, ...), shared by webui.py, the API
server and the CLI. Light on purpose: building a parser imports neither torch nor Ray; `make_service`
(ldm_core.service) takes what `ray_service_args` returns."""

from __future__ import annotations

import argparse
from typing import Any


def add_ray_flags(parser: argparse.ArgumentParser | Any) -> None:
    """The Ray pool flags (`parser` may be an argument group); `ray_service_args(args)` reads them back."""
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="run jobs on the Ray cluster at ADDR ('auto', 'ray://host:10001'); needs requirements-ray.txt",
    )
    parser.add_argument(
        "--ray-local",
        type=int,
        default=0,
        metavar="N",
        help="start a local Ray cluster of N workers (CPU workers, or one per GPU up to N) and run jobs there",
    )
    parser.add_argument(
        "--ray-threads", type=int, default=1, metavar="T", help="torch threads of each CPU worker (default 1)"
    )
    parser.add_argument(
        "--ray-min-replicas", type=int, default=None, metavar="N", help="autoscaling: fewest engine replicas"
    )
    parser.add_argument(
        "--ray-max-replicas", type=int, default=None, metavar="N", help="autoscaling: most engine replicas"
    )


def ray_service_args(args: argparse.Namespace) -> dict[str, Any]:
    """`make_service` keyword arguments from the flags `add_ray_flags` added."""
    return {
        "ray_address": getattr(args, "ray_address", None),
        "ray_local": getattr(args, "ray_local", 0) or 0,
        "ray_threads": getattr(args, "ray_threads", 1) or 1,
        "min_replicas": getattr(args, "ray_min_replicas", None),
        "max_replicas": getattr(args, "ray_max_replicas", None),
    }
