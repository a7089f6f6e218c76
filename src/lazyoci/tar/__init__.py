"""Tar, as layers use it: the one header reader of the unpacker, the zTOC builder and the header checks.

It sits below `snapshot/`, `ztoc/` and `fs/` (it imports only `errors`), so each of them reads
headers the same way without importing another.
"""

from lazyoci.tar.headers import (
    BLOCK,
    HeaderFeed,
    HeaderReader,
    TarHeader,
    first_entry,
    iter_headers,
    parse_pax_time,
)

__all__ = ["BLOCK", "HeaderFeed", "HeaderReader", "TarHeader", "first_entry", "iter_headers", "parse_pax_time"]
