"""`helios operator`: its arguments, and kopf started with them."""

from __future__ import annotations

import argparse
import logging

import kopf

from helios_operator import handlers, leader
from helios_operator.settings import add_arguments, settings_from_namespace


def add_operator_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.add_argument("--standalone", action="store_true", help="no peering with other operator replicas")
    parser.add_argument("--liveness", default=None, help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")


def run_operator(ns: argparse.Namespace) -> int:
    settings = settings_from_namespace(ns)
    handlers.controls.settings = settings
    logging.basicConfig(level=settings.log_level)
    for chatty in ("httpx", "httpcore"):  # a line per API request at debug: the operator's own lines drown
        logging.getLogger(chatty).setLevel(max(logging.INFO, logging.getLogger().level))
    if settings.leader_election_lease:  # lead before kopf starts, answering the liveness probe meanwhile
        handlers.controls.lease = leader.wait_for_lease(settings.leader_election_lease, getattr(ns, "liveness", None))
    kopf.run(
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        standalone=bool(getattr(ns, "standalone", False)),
        liveness_endpoint=getattr(ns, "liveness", None),
    )
    return 0
