"""The eStargz footer: the last bytes of the layer blob, saying where the TOC starts.

The footer is an empty gzip member whose header carries the TOC's offset in its
extra field, as 16 hex digits followed by "STARGZ": 51 bytes in eStargz (inside an
`SG` subfield), 47 bytes in the older stargz layout (the extra field is the text
alone). Both are read, as the reference reads both; anything else in those bytes
is a FormatError, so a layer whose footer lies is never taken for eStargz.
"""

from __future__ import annotations

import struct

from lazyoci.errors import FormatError
from lazyoci.oci.compression import inflate_gzip_member, sniff_compression

__all__ = ["FOOTER_SIZE", "LEGACY_FOOTER_SIZE", "parse_footer"]

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
_MAGIC = b"STARGZ"
_GZIP_FEXTRA = 0x04


def _extra_field(footer: bytes) -> bytes:
    """The gzip extra field of an empty gzip member `footer` (FormatError if it is not one)."""
    if len(footer) < 12 or sniff_compression(footer) != "gzip" or footer[2] != 8 or footer[3] != _GZIP_FEXTRA:
        raise FormatError("not an eStargz footer: no gzip header with only an extra field")
    (xlen,) = struct.unpack_from("<H", footer, 10)
    extra = footer[12:12 + xlen]
    rest = footer[12 + xlen:]
    if len(extra) != xlen:
        raise FormatError("not an eStargz footer: its extra field is cut short")
    try:
        body, after = inflate_gzip_member(rest, 1, raw=True)
    except FormatError as e:
        raise FormatError(f"not an eStargz footer: {e}") from None
    if body or after != bytes(8):
        raise FormatError("not an eStargz footer: the gzip member is not empty")
    return extra


def _offset(text: bytes) -> int:
    if len(text) != 16 + len(_MAGIC) or text[16:] != _MAGIC:
        raise FormatError("not an eStargz footer: no STARGZ mark")
    digits = text[:16]
    if not all(c in b"0123456789abcdefABCDEF" for c in digits):
        raise FormatError(f"eStargz footer: TOC offset {digits!r} is not hexadecimal")
    return int(digits, 16)


def parse_footer(tail: bytes) -> tuple[int, int]:
    """(TOC offset in the blob, footer size) from the blob's last bytes (at least 51 of them,
    or exactly 47 for an old stargz blob of that size)."""
    errors = []
    for size in (FOOTER_SIZE, LEGACY_FOOTER_SIZE):
        if len(tail) < size:
            continue
        try:
            extra = _extra_field(tail[-size:])
            if size == FOOTER_SIZE:
                if extra[:2] != b"SG" or len(extra) < 4:
                    raise FormatError("not an eStargz footer: no SG subfield")
                (sublen,) = struct.unpack_from("<H", extra, 2)
                if sublen != len(extra) - 4:
                    raise FormatError("not an eStargz footer: SG subfield of a wrong length")
                return _offset(extra[4:]), size
            return _offset(extra), size
        except FormatError as e:
            errors.append(str(e))
    raise FormatError(errors[0] if errors else f"a blob of {len(tail)} bytes is too small for an eStargz footer")
