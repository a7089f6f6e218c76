"""zTOC: the table of contents and gzip checkpoints that make a layer lazy-loadable (SOCI).

Build one from a layer blob with `build_ztoc`, read one with `Ztoc.parse`, and
extract bytes with `decompress_span` / `verify_span` / `read_range`.
"""

from lazyoci.errors import UnsupportedCompressionError
from lazyoci.ztoc.build import BUILD_TOOL, DEFAULT_SPAN_SIZE, build_ztoc
from lazyoci.ztoc.reader import TocEntry, Ztoc
from lazyoci.ztoc.spans import decompress_span, read_range, verify_span

__all__ = [
    "BUILD_TOOL",
    "DEFAULT_SPAN_SIZE",
    "TocEntry",
    "UnsupportedCompressionError",
    "Ztoc",
    "build_ztoc",
    "decompress_span",
    "read_range",
    "verify_span",
]
