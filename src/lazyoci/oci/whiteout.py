"""What a layer's tar member names mean to the layers below it: whiteouts, opaque markers, names.

The OCI image spec records deletions in a layer as entries with special names: an
entry `DIR/.wh.NAME` hides NAME of the lower layers, and `DIR/.wh..wh..opq` hides
everything the lower layers hold in DIR (an opaque directory). Overlayfs shows
the same thing its own way: a whiteout is a 0:0 character device NAME, an opaque
directory carries the xattr `trusted.overlay.opaque=y`. Both ways of serving a
layer (the unpacker, which writes a lower directory, and the lazy filesystem,
which shows one from an index) follow these rules, so they live here once.

Overlayfs trusts every `trusted.overlay.*` xattr of a lower directory, so a layer
that carried one could forge whiteouts or opaque directories its tar does not
have: such xattrs are never written nor served.
"""

from __future__ import annotations

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX = "trusted.overlay."

__all__ = ["OPAQUE_MARKER", "OPAQUE_XATTR", "OVERLAY_XATTR_PREFIX", "WHITEOUT_PREFIX",
           "is_opaque_marker", "is_overlay_xattr", "normalise", "whiteout_target"]


def is_opaque_marker(base: str) -> bool:
    """True if an entry named `base` (last path component) marks its directory opaque."""
    return base == OPAQUE_MARKER


def whiteout_target(base: str) -> str | None:
    """The name an entry called `base` hides in its directory, or None if it hides none.

    The opaque marker is not a whiteout of a name (see is_opaque_marker). The name is
    returned as spelled: "", "." or ".." are malformed whiteouts, for the caller to refuse."""
    if base.startswith(WHITEOUT_PREFIX) and base != OPAQUE_MARKER:
        return base[len(WHITEOUT_PREFIX):]
    return None


def is_overlay_xattr(name: str) -> bool:
    """True for overlayfs' own xattrs, which a layer must not carry (see the module docstring)."""
    return name.startswith(OVERLAY_XATTR_PREFIX)


def normalise(name: str) -> str | None:
    """A tar member name as a relative path without '.', or None if it escapes (`..`)."""
    if name.startswith("./"):
        name = name[2:]
    name = name.strip("/")
    if "//" not in name and "/./" not in name and ".." not in name and name not in (".", ""):
        return name            # the common case, without splitting
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            return None
        parts.append(p)
    return "/".join(parts)
