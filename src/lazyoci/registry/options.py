"""The settings the registry client is given (from the config file and flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach registries.

    `insecure_registries`: hosts (host[:port]) allowed plain HTTP or an unverified certificate.
    `mirrors`: registry host (e.g. "docker.io") -> mirror base URLs, tried in order before the
    upstream for pulls only (a mirror base may carry a path: "http://cache:5000/dockerhub").
    `docker_config`: the docker config.json with credentials (None: $DOCKER_CONFIG or ~/.docker).
    """

    insecure_registries: tuple[str, ...] = ()
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    docker_config: Path | None = None
    max_retries: int = 3
    timeout: float = 60.0
