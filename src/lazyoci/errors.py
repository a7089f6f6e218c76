"""The one exception tree of lazyoci.

Every failure a user can cause or meet (bad input, registry faults, corrupt
data) is a `LazyociError`. The CLI turns it into one line on stderr and a
nonzero exit; the FUSE layer turns it into EIO. Anything else escaping is a bug.

An error's fields are the keyword parameters of its constructor, kept as attributes of
the same name and listed by `fields()`: so an error crosses the service's control
socket as its class name, message and fields, and is raised again as the same error.

    LazyociError
    ├── ReferenceError_        malformed image reference
    ├── ConfigError            bad config file or flag value
    ├── RegistryError          the registry refused or failed (HTTP status kept)
    │   ├── AuthError          401 / 403
    │   ├── NotFoundError      404 (manifest, blob, repository)
    │   └── RangeNotSupportedError   server ignored a Range request
    ├── ServiceError           the lazyoci service is not running or broke the protocol
    ├── PullCancelled          a pull stopped: another layer failed, or the user interrupted
    ├── BuildError             buildah failed to build a Dockerfile (its error kept)
    ├── FormatError            malformed manifest, zTOC, gzip, tar ...
    │   ├── UnsafeLayerError   a layer entry would escape its directory
    │   └── UnsupportedCompressionError   a layer zTOCs cannot index (zstd)
    ├── IntegrityError         bytes do not match their digest
    ├── StoreError             local store problems
    │   ├── ImageNotFoundError no such image locally
    │   ├── SnapshotNotFoundError    no snapshot (or parent) of that key
    │   ├── SnapshotExistsError      a snapshot of that key or name exists already
    │   └── SnapshotStateError       a snapshot not in the state the call needs (committed, active, childless)
    └── ContainerError         runtime (runc) and container state errors
        ├── CommandNotFoundError      the command is not in the image (exit 127, as docker)
        └── CommandNotExecutableError the command cannot be executed (exit 126, as docker)
"""

from __future__ import annotations


class LazyociError(Exception):
    """Base of every error lazyoci reports to a user."""

    exit_code: int = 1

    def fields(self) -> dict[str, str | int | None]:
        """What the error carries besides its message, by constructor keyword."""
        return {}


class ReferenceError_(LazyociError):
    """An image reference that cannot be parsed (named to not shadow builtins.ReferenceError)."""


class ConfigError(LazyociError):
    """A config file or option value that is not valid."""


class RegistryError(LazyociError):
    """A registry answered with an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code

    def fields(self) -> dict[str, str | int | None]:
        return {"status": self.status, "code": self.code}


class AuthError(RegistryError):
    """Authentication or authorisation failed (401/403)."""


class NotFoundError(RegistryError):
    """The registry does not have the manifest, blob or repository."""


class RangeNotSupportedError(RegistryError):
    """The registry answered a Range request with the whole blob (200)."""


class FormatError(LazyociError):
    """Data that does not follow its format (manifest, zTOC, gzip, tar, config)."""


class UnsafeLayerError(FormatError):
    """A layer entry would create or change something outside its layer directory."""


class UnsupportedCompressionError(FormatError):
    """A layer compression zTOCs cannot index (zstd): the layer is skipped, as the reference does."""


class ServiceError(LazyociError):
    """The lazyoci service is not running, did not start, or broke the protocol."""


class PullCancelled(LazyociError):
    """A pull's layer workers stop when another layer failed or the user interrupted."""


class BuildError(LazyociError):
    """`build` failed: buildah is missing or stopped at a step; nothing was stored."""


class IntegrityError(LazyociError):
    """Bytes whose digest is not the one they were asked for."""

    def __init__(self, message: str, expected: str | None = None, actual: str | None = None):
        super().__init__(message)
        self.expected = expected
        self.actual = actual

    def fields(self) -> dict[str, str | int | None]:
        return {"expected": self.expected, "actual": self.actual}


class StoreError(LazyociError):
    """The local store cannot do what was asked."""


class ImageNotFoundError(StoreError):
    """No image of that name or ID exists locally."""


class SnapshotNotFoundError(StoreError):
    """No snapshot of that key, or no parent of that name (containerd's NotFound)."""


class SnapshotExistsError(StoreError):
    """A snapshot of that key or name exists already (containerd's AlreadyExists)."""


class SnapshotStateError(StoreError):
    """A snapshot is not in the state a call needs: a parent not committed, a commit of a
    non-active snapshot, a remove of one with children (containerd's FailedPrecondition)."""


class ContainerError(LazyociError):
    """The OCI runtime failed, or a container is not in a state for the request."""


class CommandNotFoundError(ContainerError):
    """A container's command does not exist in its filesystem: docker's exit status 127."""

    exit_code = 127


class CommandNotExecutableError(ContainerError):
    """A container's command exists but cannot be executed (no x bit, a directory): exit status 126."""

    exit_code = 126
