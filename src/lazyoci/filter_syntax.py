"""The `--filter KEY=VALUE` syntax docker's listings share (`images`, `ps`).

Only the syntax lives here: each listing knows its own keys and what they match.
"""

from __future__ import annotations

from collections.abc import Sequence

from lazyoci.errors import ConfigError


def split_filter(text: str, keys: Sequence[str]) -> tuple[str, str]:
    """(key, value) of one `--filter`, the key lower-cased; ConfigError for a missing `=`
    or a key the listing does not know."""
    key, sep, value = text.partition("=")
    key = key.strip().lower()
    if not sep:
        raise ConfigError(f"bad format of filter {text!r} (expected name=value)")
    if key not in keys:
        raise ConfigError(f"invalid filter {key!r} (filters: {', '.join(keys)})")
    return key, value
