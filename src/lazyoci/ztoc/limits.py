"""The caps on what a zTOC or a SOCI index may ask of a reader, each with its reason.

A zTOC comes from the registry, so its numbers are an attacker's to choose: a
1 GiB span turns a 6-byte read into a 1 GiB inflate, a million-entry name table
or a name the kernel cannot create shows a tree that differs from the tar. The
reference's `--span-size` takes any positive size; lazyoci refuses what goes
past these caps when a zTOC is parsed (`Ztoc.parse`) or an index is read
(`SociIndex.parse`), and the lazy pull then downloads the layer whole. Nothing
in lazyoci builds an index these caps would refuse (`soci create --span-size`
stops at MAX_SPAN_SIZE).

With the caps, fetching one span holds at most MAX_SPAN_BYTES compressed plus
MAX_SPAN_BYTES inflated, whatever the index says; the span manager bounds its
requests, read-ahead and write-behind queue in bytes on top of that
(fs/span_fetcher.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from lazyoci.errors import FormatError


@dataclass(frozen=True)
class Limit:
    """One cap: its name (as errors show it), its value, the unit and why it is what it is."""

    name: str
    value: int
    unit: str
    why: str

    def check(self, actual: int, what: str) -> None:
        """FormatError naming `what` and this limit when `actual` is over it."""
        if actual > self.value:
            raise FormatError(f"{what} is {actual:,} {self.unit}, over lazyoci's limit of "
                              f"{self.value:,} {self.unit} ({self.name}: {self.why})")


MiB = 1 << 20

# The reference builds 4 MiB spans by default and its --span-size has no upper bound. 64 MiB is
# 16 times the default: room for tools that choose larger spans, while one first read of a file
# still costs a bounded fetch and inflate (a span is the unit every read pays for).
MAX_SPAN_SIZE = Limit("MAX_SPAN_SIZE", 64 * MiB, "bytes",
                      "the span size a zTOC may declare, 16 times the reference's 4 MiB default")

# A gzip span ends at the first deflate block end after span_size bytes, so it holds up to one
# block more than the declared size. zlib's blocks end after at most 32767 symbols of at most 258
# bytes (about 8 MiB); 16 MiB leaves room for other encoders. The same cap holds for a span's
# compressed bytes: deflate never grows data by more than a few bytes per 64 KiB.
MAX_SPAN_BYTES = Limit("MAX_SPAN_BYTES", MAX_SPAN_SIZE.value + 16 * MiB, "bytes",
                       "the bytes one span may cover, compressed or not: the largest span size "
                       "plus the deflate block that ends it")

# The service keeps a few dozen bytes per span (its ranges, the cache's map). 100,000 spans are
# 390 GiB of layer at the default span size; only a tiny span size on an uncompressed layer
# (whose spans cost the zTOC ~80 bytes each, not a 32 KiB gzip window) comes near.
MAX_SPANS = Limit("MAX_SPANS", 100_000, "spans", "spans in one zTOC, each with state in the service")

# A zTOC is downloaded and held whole by the service. Its size grows with the layer: 32 KiB of
# gzip window per checkpoint (a 30 GiB layer at 4 MiB spans: 240 MiB) plus ~150 bytes per file.
MAX_ZTOC_BYTES = Limit("MAX_ZTOC_BYTES", 256 * MiB, "bytes",
                       "the size of one zTOC, which the service keeps in memory")

# The service keeps a compact inode table per entry; real layers hold up to a few hundred
# thousand files. Two million is far past them and keeps a mount's memory in the hundreds of MiB.
MAX_ENTRIES = Limit("MAX_ENTRIES", 2_000_000, "entries", "files in one zTOC")

# As Linux: PATH_MAX is 4096 bytes with the terminating NUL, NAME_MAX 255 bytes per component.
# A name the kernel cannot create is not in a full unpack of the layer, so a lazy view must not
# show it either (a longer one would vanish, not fail).
MAX_NAME_BYTES = Limit("MAX_NAME_BYTES", 4095, "bytes", "a path, as Linux's PATH_MAX")
MAX_COMPONENT_BYTES = Limit("MAX_COMPONENT_BYTES", 255, "bytes", "one path component, as Linux's NAME_MAX")
MAX_LINK_BYTES = Limit("MAX_LINK_BYTES", 4095, "bytes", "a link target, as Linux's PATH_MAX")

# As Linux's XATTR_NAME_MAX and XATTR_SIZE_MAX: the unpacker could not set a larger one.
MAX_XATTR_NAME_BYTES = Limit("MAX_XATTR_NAME_BYTES", 255, "bytes", "an xattr name, as Linux's XATTR_NAME_MAX")
MAX_XATTR_VALUE_BYTES = Limit("MAX_XATTR_VALUE_BYTES", 64 * 1024, "bytes",
                              "an xattr value, as Linux's XATTR_SIZE_MAX")

ALL = (MAX_SPAN_SIZE, MAX_SPAN_BYTES, MAX_SPANS, MAX_ZTOC_BYTES, MAX_ENTRIES, MAX_NAME_BYTES, MAX_COMPONENT_BYTES,
       MAX_LINK_BYTES, MAX_XATTR_NAME_BYTES, MAX_XATTR_VALUE_BYTES)


def check_name(raw: bytes, what: str, link: bool = False) -> None:
    """A path as the kernel would take it: no NUL byte, within PATH_MAX, and (unless it is a link
    target, which the kernel stores as it is) no component over NAME_MAX. A NUL would cut the name
    short where the tar does not, so the tree would show another name."""
    if b"\0" in raw:
        raise FormatError(f"{what} {raw[:64]!r} holds a NUL byte, which no Linux path can")
    (MAX_LINK_BYTES if link else MAX_NAME_BYTES).check(len(raw), what)
    if not link and len(raw) > MAX_COMPONENT_BYTES.value:   # a shorter name has no longer component
        for part in raw.split(b"/"):
            MAX_COMPONENT_BYTES.check(len(part), f"{what}: component {part[:32]!r}...")
