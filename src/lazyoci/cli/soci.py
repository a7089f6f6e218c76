"""`lazyoci soci ...`: create, convert, push, and inspect SOCI indexes and zTOCs."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from lazyoci.cli.shared import image_service, prefetch_files, prefetch_flags, soci_build_options
from lazyoci.errors import ConfigError, LazyociError, StoreError
from lazyoci.oci.platform import Platform

if TYPE_CHECKING:
    from lazyoci.soci.build import SociBuildOptions


def _platforms(platform: tuple[str, ...]) -> list[Platform]:
    return [Platform.parse(p) for p in platform]


def _optimized(options: "SociBuildOptions", optimizations: tuple[str, ...]) -> "SociBuildOptions":
    """`--optimizations` as the reference takes it: repeatable, or comma-separated."""
    import dataclasses
    names = tuple(n.strip() for o in optimizations for n in o.split(",") if n.strip())
    return dataclasses.replace(options, optimizations=names) if names else options


_OPTIMIZATIONS_HELP = "Optional optimizations, as the reference's: xattr (layers without xattrs are " \
                      "marked disable-xattrs)."


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
@click.option("--optimizations", multiple=True, help=_OPTIMIZATIONS_HELP)
@prefetch_flags
@click.argument("ref")
def create_cmd(span_size, min_layer_size, platform, all_platforms, force, remote, push_after, optimizations,
               prefetch_file, prefetch_files_json, ref) -> None:
    """Build a SOCI index (v1) for REF."""
    if platform and all_platforms:
        raise ConfigError("--platform and --all-platforms are exclusive")
    if push_after and not remote:
        raise ConfigError("--push goes with --remote (for a local image use `lazyoci soci push`)")
    options = _optimized(soci_build_options(span_size, min_layer_size, force,
                                            prefetch_files=prefetch_files(prefetch_file, prefetch_files_json)),
                         optimizations)
    images = image_service()
    try:
        if remote:
            from lazyoci.soci.image_service_wiring import index_remote_image
            if all_platforms or len(platform) > 1:
                raise ConfigError("--remote indexes one platform per run")
            plat = _platforms(platform)[0] if platform else None
            result, _ = index_remote_image(images, ref, options, plat, push_after, click.echo)
            click.echo(f"soci index: {result.digest}")
            return
        from lazyoci.soci.image_service_wiring import index_local_image
        targets = _local_targets(images, ref, _platforms(platform), all_platforms)
        for image in targets:
            result = index_local_image(images, image, options, click.echo)
            click.echo(f"soci index: {result.digest} ({result.platform})")
    finally:
        images.close()


def _local_targets(images, ref: str, platforms: list[Platform], all_platforms: bool) -> list:
    if not all_platforms:
        return [images.get(ref, p) for p in platforms] if platforms else [images.get(ref)]
    first = images.get(ref)
    rec = images.lookup(first.digest)
    return [images.get(first.digest, Platform.parse(p)) for _, p, _ in rec.platforms]


@soci_group.command("convert")
@click.option("--span-size", type=int, default=None, help="Uncompressed bytes per span (default 4 MiB).")
@click.option("--min-layer-size", type=int, default=None, help="Layers smaller than this get no zTOC.")
@click.option("--platform", multiple=True, help="Platform to convert (repeatable).")
@click.option("--all-platforms", is_flag=True, help="Convert every platform stored locally.")
@click.option("--force", is_flag=True, help="Rebuild zTOCs even when one exists for a layer.")
@click.option("--optimizations", multiple=True, help=_OPTIMIZATIONS_HELP)
@prefetch_flags
@click.argument("src")
@click.argument("dst")
def convert_cmd(span_size, min_layer_size, platform, all_platforms, force, optimizations, prefetch_file,
                prefetch_files_json, src, dst) -> None:
    """Make DST: SRC with SOCI v2 indexes inside it (push DST with `lazyoci push`)."""
    from lazyoci.soci.image_service_wiring import convert_local_image
    if platform and all_platforms:
        raise ConfigError("--platform and --all-platforms are exclusive")
    images = image_service()
    try:
        result = convert_local_image(images, src, dst,
                                     _optimized(soci_build_options(span_size, min_layer_size, force, "v2",
                                                                   prefetch_files(prefetch_file,
                                                                                  prefetch_files_json)),
                                                optimizations),
                                     _platforms(platform) or None, all_platforms, click.echo)
    finally:
        images.close()
    click.echo(f"converted image index: {result.digest}")
    for r in result.indexes:
        click.echo(f"soci index: {r.digest} ({r.platform})")


@soci_group.command("optimize", context_settings={"allow_interspersed_args": False})
@click.option("--soci-index-digest", default=None, help="Record with this SOCI index instead of discovering one.")
@click.option("--keep-spans", is_flag=True,
              help="Keep the index's zTOCs instead of laying their spans out around the recorded reads.")
@click.argument("ref")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def optimize_cmd(soci_index_digest, keep_spans, ref, command) -> None:
    """Run REF lazily (with COMMAND, or its own), record what it reads, and push its SOCI index
    again with the spans it read as prefetch artifacts, each gzip layer's spans laid out around
    those reads (the image is not changed)."""
    from lazyoci.cli.context import app
    from lazyoci.cli.shared import registry_options
    from lazyoci.images.service import ImageService
    from lazyoci.soci.optimize import optimize
    from lazyoci.store.layout import DataRoot

    if command[:1] == ("--",):      # `soci optimize REF -- CMD...`: click keeps the `--` after REF
        command = command[1:]
    ctx = app()
    result = optimize(DataRoot(ctx.root), ctx.config, lambda root: ImageService(root, registry_options(ctx)),
                      ref, tuple(command), soci_index_digest, lambda line: click.echo(line, err=True),
                      keep_spans)
    if result.exit_code:
        click.echo(f"the workload exited {result.exit_code}; its reads up to then were recorded", err=True)
    click.echo(f"soci index: {result.index.digest} (replaces {result.replaced} for lazy pulls that name it "
               f"with --soci-index-digest)")


@soci_group.command("push")
@click.option("--platform", default=None, help="Platform whose index to push (default: the host's).")
@click.option("--existing-index", type=click.Choice(["warn", "skip", "allow"]), default="warn",
              show_default=True, help="What to do when the registry already has a SOCI index for the image.")
@click.argument("ref")
def push_cmd(platform, existing_index, ref) -> None:
    """Push the newest v1 SOCI index of local image REF to REF's repository."""
    from lazyoci.soci.image_service_wiring import push_local_image_index

    images = image_service()
    try:
        push_local_image_index(images, ref, Platform.parse(platform) if platform else None, click.echo,
                               existing_index)
    finally:
        images.close()


@soci_group.group("prefetch")
def prefetch_group() -> None:
    """Prefetch artifacts of the SOCI indexes stored locally."""


@prefetch_group.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Digests only.")
def prefetch_list(quiet) -> None:
    """List the prefetch artifacts (the reference's `soci prefetch ls`)."""
    from lazyoci.soci.prefetch import present_artifacts, stored_artifacts
    from lazyoci.soci.index_records import SociRecords
    images = image_service()
    records = SociRecords(images.db)
    if quiet:
        for a in stored_artifacts(images.blobs, records):
            click.echo(a.digest)
        return
    now = time.time()
    _table([("DIGEST", "LAYER DIGEST", "SPANS", "CREATED")] +
           [(a.digest, a.layer_digest, str(len(artifact.spans())), f"{int(now - a.created_at)}s ago")
            for a, artifact in present_artifacts(images.blobs, records)])


@prefetch_group.command("info")
@click.argument("digest")
def prefetch_info(digest) -> None:
    """Show one prefetch artifact: its span ranges and the layer it belongs to."""
    from lazyoci.soci.prefetch import stored_artifact
    from lazyoci.soci.index_records import SociRecords
    images = image_service()
    digest = _full_digest(digest)
    a, artifact = stored_artifact(images.blobs, SociRecords(images.db), digest)
    click.echo(f"Digest:        {digest}\nVersion:       {artifact.version}\n"
               f"Span Ranges:   {len(artifact.prefetch_spans)}\nLayer Digest:  {a.layer_digest}\n"
               f"Size:          {a.size} bytes\nIndex:         {a.index_digest}\n\nPrefetch Spans:")
    for n, r in enumerate(artifact.prefetch_spans):
        click.echo(f"  [{n}] StartSpan: {r.start_span}, EndSpan: {r.end_span} "
                   f"(covers {r.end_span - r.start_span + 1} spans)\n      Priority: {r.priority}")
    click.echo(f"\nTotal spans to prefetch: {len(artifact.spans())}")


@soci_group.group("index")
def index_group() -> None:
    """SOCI indexes stored locally."""


@index_group.command("list")
@click.option("--ref", default=None, help="Only the indexes of this image.")
@click.option("-q", "--quiet", is_flag=True, help="Digests only.")
def index_list(ref, quiet) -> None:
    """List the SOCI indexes stored locally."""
    from lazyoci.soci.image_indexes import indexes_of_image
    from lazyoci.soci.index_records import SociRecords
    images = image_service()
    records = SociRecords(images.db)
    recs = indexes_of_image(records, images.records, images.get(ref)) if ref else records.indexes()
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
@click.option("--ref", default=None, help="Remove the indexes of this image (every platform stored).")
@click.argument("digests", nargs=-1)
def index_rm(ref, digests) -> None:
    """Forget indexes; their zTOCs are deleted by gc when nothing else uses them."""
    from lazyoci.soci.index_records import SociRecords
    if ref and digests:
        raise ConfigError("please provide either index digests or image ref, but not both")
    if not ref and not digests:
        raise ConfigError("give the digests of the indexes to remove, or --ref IMAGE")
    images = image_service()
    records = SociRecords(images.db)
    if ref:
        from lazyoci.soci.image_indexes import indexes_of_image
        digests = tuple(dict.fromkeys(r.index_digest for r in indexes_of_image(records, images.records,
                                                                                 images.get(ref))))
    for d in digests:
        d = _full_digest(d)
        if not records.remove_index(d):
            raise StoreError(f"no SOCI index {d}")
        click.echo(d)
    images.gc()
    records.prune(images.blobs.has)


# the reference's spellings: `soci index list|ls`, `soci index remove|rm`, `soci ztoc list|ls`
index_group.add_command(index_list, "ls")
index_group.add_command(index_rm, "remove")


@soci_group.group("ztoc")
def ztoc_group() -> None:
    """zTOCs stored locally."""


@ztoc_group.command("list")
@click.option("--ztoc-digest", default=None, help="Only this zTOC.")
@click.option("-q", "--quiet", is_flag=True, help="Digests only.")
def ztoc_list(ztoc_digest, quiet) -> None:
    """List the zTOCs stored locally."""
    from lazyoci.soci.index_records import SociRecords
    images = image_service()
    recs = SociRecords(images.db).ztocs(_full_digest(ztoc_digest) if ztoc_digest else None)
    if quiet:
        for r in recs:
            click.echo(r.ztoc_digest)
        return
    _table([("DIGEST", "SIZE", "LAYER DIGEST", "SPAN SIZE")] +
           [(r.ztoc_digest, str(r.ztoc_size), r.layer_digest, str(r.span_size)) for r in recs])


ztoc_group.add_command(ztoc_list, "ls")


@soci_group.command("rebuild-db")
def rebuild_db_cmd() -> None:
    """Rebuild the SOCI records from the blobs in the store (as the reference's rebuild-db)."""
    from lazyoci.soci.index_records import SociRecords
    from lazyoci.soci.rebuild import rebuild_records
    images = image_service()
    try:
        r = rebuild_records(images.blobs, SociRecords(images.db), images.records)
    finally:
        images.close()
    click.echo(f"removed {r.removed} records of missing blobs; recorded {r.indexes_added} SOCI indexes "
               f"and {r.ztocs_added} zTOCs")


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
    from lazyoci.soci.index_records import SociRecords
    from lazyoci.soci.inspect import get_file
    images = image_service()
    try:
        data = get_file(images.blobs, SociRecords(images.db), lambda: images.client, _full_digest(digest), path, ref)
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
