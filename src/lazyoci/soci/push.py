"""Push SOCI artifacts: a v1 index with its zTOCs and config, then the referrer link.

It walks the graph as the reference's `soci push` does (oras CopyGraph): every
blob the index names is pushed unless the registry has it ("skipped"), the
subject (the image manifest) must already be there, the index goes last, by
digest, so it is never visible before what it names. Registries without the
referrers API (distribution 2.8) learn about it through the `sha256-<hex>` tag
index that `RegistryClient.add_referrer` maintains.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from lazyoci.errors import LazyociError, NotFoundError, RegistryError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import Descriptor
from lazyoci.oci.reference import Reference
from lazyoci.soci.index import SociIndex, config_descriptor

if TYPE_CHECKING:
    from lazyoci.registry import RegistryClient
    from lazyoci.store.blobs import BlobStore

Log = Callable[[str], None]
EXISTING_POLICIES = ("warn", "skip", "allow")
# The reference (through oras) uploads three blobs at once.
UPLOAD_CONCURRENCY = 3


@dataclass(frozen=True)
class PushResult:
    index_digest: str
    pushed: tuple[str, ...]       # digests uploaded
    skipped: tuple[str, ...]      # digests the registry already had
    index_skipped: bool           # the registry already had the index itself


def manifest_exists(client: "RegistryClient", ref: Reference, digest: str) -> bool:
    try:
        client.resolve(ref.with_digest(digest))
        return True
    except NotFoundError:
        return False


def push_index(client: "RegistryClient", ref: Reference, blobs: "BlobStore", index: SociIndex,
               log: Log = lambda line: None, existing: str = "warn") -> PushResult:
    """Push a v1 SOCI index (stored in `blobs` with its zTOCs) next to the image in `ref`'s repository."""
    if existing not in EXISTING_POLICIES:
        raise LazyociError(f"--existing-index must be one of {', '.join(EXISTING_POLICIES)}, not {existing!r}")
    if index.version != "v1" or index.subject is None:
        raise LazyociError(f"SOCI index {index.digest} is a v2 index: it travels inside the converted "
                           "image (push that image), not through the referrers API")
    subject = index.subject
    if existing != "allow":
        log("checking if a soci index already exists in remote repository...")
        found = [d for d in client.referrers(ref, subject.digest, mt.SOCI_INDEX_V1)
                 if d.artifact_type in (None, mt.SOCI_INDEX_V1)]
        if found:
            msg = ("multiple soci indices found in remote repository" if len(found) > 1
                   else f"soci index found in remote repository with digest: {found[0].digest}")
            if existing == "skip":
                log(f"{msg}: skipping pushing artifacts for image manifest: {subject.digest}")
                return PushResult(index.digest, (), (), True)
            log(f"[WARN] {msg}: pushing index anyway")
    log(f"pushing soci index with digest: {index.digest}")

    if manifest_exists(client, ref, index.digest):
        # oras stops at a node the target already has: nothing below it is re-sent.
        log(f"skipped artifact with digest: {index.digest}")
        client.add_referrer(ref, subject.digest, index.descriptor())
        return PushResult(index.digest, (), (index.digest,), True)

    pushed: list[str] = []
    skipped: list[str] = []

    def copy_blob(d: Descriptor) -> None:
        if client.blob_exists(ref, d.digest):
            log(f"skipped artifact with digest: {d.digest}")
            skipped.append(d.digest)
            return
        if not blobs.has(d.digest):
            raise LazyociError(f"SOCI artifact {d.digest} is not in the local store; "
                               "rebuild the index with `lazyoci soci create --force`")
        log(f"pushing artifact with digest: {d.digest}")
        client.push_blob(ref, d.digest, d.size, lambda: blobs.open(d.digest))
        log(f"successfully pushed artifact with digest: {d.digest}")
        pushed.append(d.digest)

    def copy_subject() -> None:
        if not manifest_exists(client, ref, subject.digest):
            raise NotFoundError(f"image manifest {subject.digest} is not in {ref.name}: push the image "
                                "before its SOCI index", status=404)
        log(f"skipped artifact with digest: {subject.digest}")
        skipped.append(subject.digest)

    nodes: list[Callable[[], None]] = [copy_subject, lambda: copy_blob(config_descriptor(index))]
    nodes += [partial(copy_blob, d) for d in index.ztocs + index.prefetch]
    with ThreadPoolExecutor(max_workers=UPLOAD_CONCURRENCY, thread_name_prefix="soci-push") as pool:
        futures = [pool.submit(n) for n in nodes]
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e

    log(f"pushing artifact with digest: {index.digest}")
    client.put_manifest(ref.with_digest(index.digest), index.raw, mt.OCI_MANIFEST)
    log(f"successfully pushed artifact with digest: {index.digest}")
    pushed.append(index.digest)
    client.add_referrer(ref, subject.digest, index.descriptor())
    return PushResult(index.digest, tuple(pushed), tuple(skipped), False)


def push_manifest_graph(client: "RegistryClient", ref: Reference, blobs: "BlobStore", raw: bytes,
                        media_type: str, log: Log = lambda line: None) -> None:
    """Push one manifest's blobs then the manifest by digest (used for the converted image's
    SOCI index and manifests, whose blobs are all local)."""
    from lazyoci.oci.manifest import Manifest

    m = Manifest.parse(raw, media_type)
    for d in (m.config, *m.layers):
        if client.blob_exists(ref, d.digest):
            log(f"skipped artifact with digest: {d.digest}")
            continue
        if not blobs.has(d.digest):
            raise RegistryError(f"blob {d.digest} is neither in {ref.name} nor in the local store")
        log(f"pushing artifact with digest: {d.digest}")
        client.push_blob(ref, d.digest, d.size, lambda d=d: blobs.open(d.digest))
        log(f"successfully pushed artifact with digest: {d.digest}")
    client.put_manifest(ref.with_digest(m.digest), raw, media_type)
