"""`lazyoci soci ...`: create, convert, push, and inspect SOCI indexes and zTOCs."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import click

from lazyoci.cli.shared import image_service, soci_build_options
from lazyoci.errors import ConfigError, LazyociError, StoreError
from lazyoci.oci.platform import Platform


def _platforms(platform: tuple[str, ...]) -> list[Platform]:
    return [Platform.parse(p) for p in platform]


@click.group("soci")
def soci_group() -> None:
    """SOCI indexes: make images lazy-loadable without changing them."""


@soci_group.command("create")
@click.option("--span-size", type=int, default=None, help="Uncompressed bytes per span (default 4 MiB).")
@click.option("--min-layer-size", type=int, default=None,
              help="Layers smaller than this get no zTOC (default 10 MiB).")
@click.option("--platform", multiple=True, help="Platform to index (repeatable; default: the host's).")
@click.option("--all-platforms", is_flag=True, help="Index every platform stored locally.")
@click.option("--force", is_flag=True, help="Rebuild zTOCs even when one exists for a layer.")
@click.option("--remote", is_flag=True, help="Index an image in its registry, streaming each layer once.")
@click.option("--push", "push_after", is_flag=True, help="With --remote: push the index when built.")
@click.argument("ref")
def create_cmd(span_size, min_layer_size, platform, all_platforms, force, remote, push_after, ref) -> None:
    """Build a SOCI index (v1) for REF."""
    if platform and all_platforms:
        raise ConfigError("--platform and --all-platforms are exclusive")
    if push_after and not remote:
        raise ConfigError("--push goes with --remote (for a local image use `lazyoci soci push`)")
    options = soci_build_options(span_size, min_layer_size, force)
    images = image_service()
    try:
        if remote:
            from lazyoci.soci.remote import create_remote
            if all_platforms or len(platform) > 1:
                raise ConfigError("--remote indexes one platform per run")
            plat = _platforms(platform)[0] if platform else None
            result, _ = create_remote(images, ref, options, plat, push_after, click.echo)
            click.echo(f"soci index: {result.digest}")
            return
        from lazyoci.soci.build import build_index
        targets = _local_targets(images, ref, _platforms(platform), all_platforms)
        for image in targets:
            result = build_index(images, image, options, click.echo)
            click.echo(f"soci index: {result.digest} ({result.platform})")
    finally:
        images.close()


def _local_targets(images, ref: str, platforms: list[Platform], all_platforms: bool) -> list:
    if not all_platforms:
        return [images.get(ref, p) for p in platforms] if platforms else [images.get(ref)]
    first = images.get(ref)
    rec = images.records.content(first.digest)
    return [images.get(first.digest, Platform.parse(p)) for _, p, _ in rec.platforms]


@soci_group.command("convert")
@click.option("--span-size", type=int, default=None, help="Uncompressed bytes per span (default 4 MiB).")
@click.option("--min-layer-size", type=int, default=None, help="Layers smaller than this get no zTOC.")
@click.option("--platform", multiple=True, help="Platform to convert (repeatable).")
@click.option("--all-platforms", is_flag=True, help="Convert every platform stored locally.")
@click.option("--force", is_flag=True, help="Rebuild zTOCs even when one exists for a layer.")
@click.argument("src")
@click.argument("dst")
def convert_cmd(span_size, min_layer_size, platform, all_platforms, force, src, dst) -> None:
    """Make DST: SRC with SOCI v2 indexes inside it (push DST with `lazyoci push`)."""
    from lazyoci.soci.convert import convert
    if platform and all_platforms:
        raise ConfigError("--platform and --all-platforms are exclusive")
    images = image_service()
    try:
        result = convert(images, src, dst, soci_build_options(span_size, min_layer_size, force, "v2"),
                         _platforms(platform) or None, all_platforms, click.echo)
    finally:
        images.close()
    click.echo(f"converted image index: {result.digest}")
    for r in result.indexes:
        click.echo(f"soci index: {r.digest} ({r.platform})")


@soci_group.command("push")
@click.option("--platform", default=None, help="Platform whose index to push (default: the host's).")
@click.option("--existing-index", type=click.Choice(["warn", "skip", "allow"]), default="warn",
              show_default=True, help="What to do when the registry already has a SOCI index for the image.")
@click.argument("ref")
def push_cmd(platform, existing_index, ref) -> None:
    """Push the newest v1 SOCI index of local image REF to REF's repository."""
    from lazyoci.oci.reference import Reference
    from lazyoci.soci.index import SociIndex
    from lazyoci.soci.push import push_index
    from lazyoci.soci.records import SociRecords

    images = image_service()
    try:
        image = images.get(ref, Platform.parse(platform) if platform else None)
        all_recs = SociRecords(images.db).indexes(manifest_digest=image.manifest.digest)
        recs = [r for r in all_recs if r.version == "v1"]
        if not recs and all_recs:
            raise StoreError(f"{ref} only has SOCI v2 indexes: they travel inside the converted image, "
                             "push it with `lazyoci push`")
        if not recs:
            raise StoreError(f"no v1 SOCI index for {ref} ({image.config.platform}): "
                             "run `lazyoci soci create` first")
        index = SociIndex.parse(images.blobs.read(recs[-1].index_digest))
        push_index(images.client, Reference.parse(ref), images.blobs, index, click.echo, existing_index)
    finally:
        images.close()


@soci_group.group("index")
def index_group() -> None:
    """SOCI indexes stored locally."""


@index_group.command("list")
@click.option("--ref", default=None, help="Only the indexes of this image.")
@click.option("-q", "--quiet", is_flag=True, help="Digests only.")
def index_list(ref, quiet) -> None:
    from lazyoci.soci.records import SociRecords
    images = image_service()
    recs = SociRecords(images.db).indexes()
    if ref:
        image = images.get(ref)
        rec = images.records.content(image.digest)
        manifests = {m for m, _, _ in rec.platforms} if rec else {image.manifest.digest}
        recs = [r for r in recs if r.manifest_digest in manifests]
    if quiet:
        for r in recs:
            click.echo(r.index_digest)
        return
    rows = [("DIGEST", "SIZE", "IMAGE REF", "PLATFORM", "MEDIA TYPE", "MANIFEST VERSION", "CREATED")]
    now = time.time()
    for r in recs:
        rows.append((r.index_digest, str(r.size), r.image_name or "", r.platform,
                     "application/vnd.oci.image.manifest.v1+json", r.version, f"{int(now - r.created_at)}s ago"))
    _table(rows)


@index_group.command("info")
@click.argument("digest")
def index_info(digest) -> None:
    """Print the index manifest (pretty JSON)."""
    images = image_service()
    click.echo(json.dumps(json.loads(images.blobs.read(_full_digest(digest))), indent=2))


@index_group.command("rm")
@click.argument("digests", nargs=-1, required=True)
def index_rm(digests) -> None:
    """Forget indexes; their zTOCs are deleted by gc when nothing else uses them."""
    from lazyoci.soci.records import SociRecords
    images = image_service()
    records = SociRecords(images.db)
    for d in digests:
        d = _full_digest(d)
        if not records.remove_index(d):
            raise StoreError(f"no SOCI index {d}")
        click.echo(d)
    images.gc()
    records.prune(images.blobs.has)


@soci_group.group("ztoc")
def ztoc_group() -> None:
    """zTOCs stored locally."""


@ztoc_group.command("list")
@click.option("--ztoc-digest", default=None, help="Only this zTOC.")
@click.option("-q", "--quiet", is_flag=True, help="Digests only.")
def ztoc_list(ztoc_digest, quiet) -> None:
    from lazyoci.soci.records import SociRecords
    images = image_service()
    recs = SociRecords(images.db).ztocs(_full_digest(ztoc_digest) if ztoc_digest else None)
    if quiet:
        for r in recs:
            click.echo(r.ztoc_digest)
        return
    _table([("DIGEST", "SIZE", "LAYER DIGEST", "SPAN SIZE")] +
           [(r.ztoc_digest, str(r.ztoc_size), r.layer_digest, str(r.span_size)) for r in recs])


@ztoc_group.command("info")
@click.argument("digest")
def ztoc_info(digest) -> None:
    """Print a zTOC as JSON: version, build tool, sizes, spans, and every file with its spans."""
    from lazyoci.soci.inspect import ztoc_info as info
    images = image_service()
    d = _full_digest(digest)
    click.echo(json.dumps(info(images.blobs.read(d)), indent=2))


@ztoc_group.command("get-file")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write the file here instead of stdout.")
@click.option("--ref", default=None, help="Fetch the spans from this image's registry when the layer "
                                          "is not stored locally.")
@click.argument("digest")
@click.argument("path")
def ztoc_get_file(output, ref, digest, path) -> None:
    """Extract one file of a layer, decompressing only the spans that hold it."""
    from lazyoci.soci.inspect import get_file
    images = image_service()
    try:
        data = get_file(images, _full_digest(digest), path, ref)
    finally:
        images.close()
    if output:
        output.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def _full_digest(d: str) -> str:
    from lazyoci.oci.digest import Digest
    d = d if ":" in d else "sha256:" + d
    try:
        return str(Digest.parse(d))
    except LazyociError:
        raise ConfigError(f"not a digest: {d!r}") from None


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("    ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
