"""The settings the registry client is given (from the config file and flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class TransferLimits:
    """When a blob transfer counts as stalled, so that a registry that stops sending (or sends a
    byte now and then) ends in an error instead of holding a reader forever.

    `deadline`: seconds for the whole transfer, retries and their pauses included; None: none
    (a whole layer of a full pull may take hours on a slow link and still be fine).
    `min_bytes_per_second` over every `rate_window` seconds of a transfer, the first ones
    included: a slower stretch ends the attempt (retried like a dropped connection); 0: no minimum.
    The same window bounds the wait for a first byte.
    """

    deadline: float | None = None
    min_bytes_per_second: float = 0.0
    rate_window: float = 60.0


# Lazy reads: a stalled 4 MiB span gives up within half a minute; a 1 MB/s link still serves
# two spans per request (8 MiB) in well under the deadline.
RANGE_LIMITS = TransferLimits(deadline=30.0, min_bytes_per_second=16 * 1024, rate_window=5.0)
# Full pulls: no deadline on a multi-GB layer, only a floor that tells a stall from a slow link.
BLOB_LIMITS = TransferLimits(deadline=None, min_bytes_per_second=1024, rate_window=60.0)


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach registries.

    `insecure_registries`: hosts (host[:port]) allowed plain HTTP or an unverified certificate.
    `mirrors`: registry host (e.g. "docker.io") -> mirror base URLs, tried in order before the
    upstream for pulls only (a mirror base may carry a path: "http://cache:5000/dockerhub").
    `docker_config`: the docker config.json with credentials (None: $DOCKER_CONFIG or ~/.docker).
    `range_limits`: Range reads of lazy loading; `blob_limits`: whole-blob downloads.
    """

    insecure_registries: tuple[str, ...] = ()
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    docker_config: Path | None = None
    max_retries: int = 3
    timeout: float = 60.0
    range_limits: TransferLimits = RANGE_LIMITS
    blob_limits: TransferLimits = BLOB_LIMITS
