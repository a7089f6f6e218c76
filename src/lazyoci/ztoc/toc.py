"""The TOC half of a zTOC: the entries of a tar stream, with where each one's data starts.

The tar stream is fed in chunks of any size (straight from the inflater's output
buffer) to the one tar header reader (`lazyoci.tar`), which follows Go's
archive/tar as the reference snapshotter does, so offsets and metadata agree with
it. What is the zTOC's own: only the seven entry types it names (a contiguous
file, a sparse file or any other type refuses the layer), and numbers its fields
can hold. Times are written and read as RFC 3339 with nanoseconds.
"""

from __future__ import annotations

import datetime as _dt
import re
from operator import attrgetter

from lazyoci.errors import FormatError
from lazyoci.tar.headers import BLOCK, HeaderFeed, TarHeader

__all__ = ["BLOCK", "TarEntry", "TocBuilder", "ZTOC_TYPES", "format_rfc3339_nano", "parse_rfc3339_nano"]

TarEntry = TarHeader     # one TOC entry as the builder records it (raw bytes, as in the tar)
ZTOC_TYPES = frozenset(("reg", "hardlink", "symlink", "char", "block", "dir", "fifo"))
_TYPE = attrgetter("type")


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


def format_rfc3339_nano(mtime_ns: int) -> str:
    """Go's time.RFC3339Nano in UTC: fraction without trailing zeros, omitted when zero."""
    sec, ns = divmod(mtime_ns, 1_000_000_000)
    try:
        t = _EPOCH + _dt.timedelta(seconds=sec)
    except OverflowError:
        return ""   # Go's MarshalText fails for such years; the reference then writes ""
    frac = f".{ns:09d}".rstrip("0") if ns else ""
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}{frac}Z"


_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")


_SECONDS: dict[str, int] = {}   # "YYYY-MM-DDTHH:MM:SS" + zone -> seconds since the epoch


def parse_rfc3339_nano(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time (any offset); FormatError if malformed.
    The seconds are memoised by their text: a layer's files are written within a few seconds
    of each other, and only the fraction differs (python-ml's largest layer: 19,833 times, 29
    seconds), while the calendar arithmetic is most of a parse."""
    m = _RFC3339.fullmatch(text)
    if not m:
        raise FormatError(f"bad mod_time {text!r} in zTOC (want RFC 3339)")
    tz = m.group(8)
    key = text[:19] + tz      # the regex's first six groups are 19 characters wide
    sec = _SECONDS.get(key)
    if sec is None:
        y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
        if tz == "Z":
            offset = 0
        else:
            offset = (int(tz[1:3]) * 60 + int(tz[4:6])) * 60 * (1 if tz[0] == "+" else -1)
        try:
            t = _dt.datetime(y, mo, d, h, mi, s, tzinfo=_dt.timezone.utc)
        except ValueError:
            raise FormatError(f"bad mod_time {text!r} in zTOC") from None
        sec = int((t - _EPOCH).total_seconds()) - offset
        if len(_SECONDS) < 4096:
            _SECONDS[key] = sec
    frac = m.group(7)
    return sec * 1_000_000_000 + (int((frac + "00000000")[:9]) if frac else 0)


class TocBuilder(HeaderFeed):
    """Feed it the tar stream with `feed`, then call `finish` for the entries (the reader keeps
    numbers within what the zTOC's fields hold: int64, and uint32 for uid and gid)."""

    def finish(self) -> list[TarHeader]:
        entries = super().finish()
        if not ZTOC_TYPES.issuperset(map(_TYPE, entries)):
            bad = next(e for e in entries if e.type not in ZTOC_TYPES)
            raise FormatError(f"unsupported tar entry type {bad.type!r} at offset {bad.offset - BLOCK}")
        return entries
