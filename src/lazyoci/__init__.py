"""lazyoci: a Linux container tool whose images start before they finish downloading.

The library is the product; the `lazyoci` command is a thin shell over it.
"""

from lazyoci.errors import (
    ConfigError,
    ContainerError,
    FormatError,
    ImageNotFoundError,
    IntegrityError,
    LazyociError,
    ReferenceError_,
    RegistryError,
    ServiceError,
    StoreError,
    UnsafeLayerError,
    UnsupportedCompressionError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ContainerError",
    "FormatError",
    "ImageNotFoundError",
    "IntegrityError",
    "LazyociError",
    "ReferenceError_",
    "RegistryError",
    "ServiceError",
    "StoreError",
    "UnsafeLayerError",
    "UnsupportedCompressionError",
    "__version__",
]
