"""`lazyoci containerd pull`: pull an image into containerd so that its layers are lazy.

Like the reference's `soci image rpull`: the image's manifest and config go into
containerd's content store, then each layer is prepared on the chosen snapshotter with
the labels a remote snapshotter reads (`containerd.io/snapshot.ref` and the `cri.*`
image labels). When lazyoci's soci snapshotter serves the layer lazily it answers
AlreadyExists and nothing is downloaded; otherwise the layer is fetched from the
registry into the content store (containerd checks its digest), unpacked by
containerd's diff service, checked against the config's diff ID and committed. The
image record comes last, and a lease holds everything until then.

The registry is reached with lazyoci's own client (docker credentials, mirrors,
insecure registries of the config); containerd never needs credentials of its own.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from lazyoci.containerd.client import ContainerdClient
from lazyoci.containerd.remote import (LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST,
                                       LABEL_MANIFEST_DIGEST, LABEL_TARGET)
from lazyoci.errors import IntegrityError, LazyociError, SnapshotExistsError
from lazyoci.images.progress import Kind, ProgressEvent, ProgressSink, no_progress, row_key
from lazyoci.oci.digest import verify_bytes
from lazyoci.oci.manifest import Descriptor, ImageConfig, Index, Manifest, chain_ids, parse_any
from lazyoci.oci.platform import Platform
from lazyoci.oci.reference import Reference
from lazyoci.registry import RegistryClient

__all__ = ["ContainerdPull", "pull_into_containerd"]

_LABEL_MAX = 4096      # containerd's limit on a label (key and value)


@dataclass(frozen=True)
class ContainerdPull:
    """What a pull did: the image name in containerd, its top chain ID, and which layers were lazy."""

    name: str
    chain_id: str
    lazy: tuple[str, ...]          # layer digests served lazily
    downloaded: tuple[str, ...]    # layer digests downloaded and unpacked by containerd
    present: tuple[str, ...]       # layers whose snapshot containerd had already


def _layers_label(layers: tuple[Descriptor, ...]) -> str:
    """Comma-separated digests of the layers from this one on, as many as a label holds."""
    out = ""
    for d in layers:
        item = d.digest if not out else "," + d.digest
        if len(LABEL_IMAGE_LAYERS) + len(out) + len(item) > _LABEL_MAX:
            break
        out += item
    return out


def pull_into_containerd(registry: RegistryClient, containerd: ContainerdClient, ref: str,
                         snapshotter: str = "soci", platform: Platform | None = None,
                         progress: ProgressSink = no_progress) -> ContainerdPull:
    reference = Reference.parse(ref)
    progress(ProgressEvent(str(reference), "resolve", "resolving"))
    raw, media_type, digest = registry.get_manifest(reference)
    top = (media_type, digest, len(raw))
    blobs: list[tuple[bytes, str, dict[str, str]]] = []      # small blobs to write, with their labels
    obj = parse_any(raw, media_type)
    if isinstance(obj, Index):
        desc = obj.select(platform or Platform.host())
        position = next(i for i, d in enumerate(obj.manifests) if d.digest == desc.digest)
        blobs.append((raw, digest, {f"containerd.io/gc.ref.content.m.{position}": desc.digest}))
        raw, media_type, digest = registry.get_manifest(reference.with_digest(desc.digest))
        obj = Manifest.parse(raw, media_type)
    manifest, manifest_digest = obj, digest
    assert isinstance(manifest, Manifest)
    progress(ProgressEvent(str(reference), "resolve", "resolved"))
    config_raw = b"".join(registry.iter_blob(reference, manifest.config.digest, manifest.config.size))
    verify_bytes(config_raw, manifest.config.digest, "image config")
    config = ImageConfig.parse(config_raw)
    diff_ids = list(config.diff_ids)
    if len(diff_ids) != len(manifest.layers):
        raise IntegrityError(f"image config lists {len(diff_ids)} diff IDs for {len(manifest.layers)} layers")
    chains = chain_ids(diff_ids)
    manifest_labels = {"containerd.io/gc.ref.content.config": manifest.config.digest}
    manifest_labels.update({f"containerd.io/gc.ref.content.l.{i}": l.digest for i, l in enumerate(manifest.layers)})
    blobs.append((raw, manifest_digest, manifest_labels))
    blobs.append((config_raw, manifest.config.digest,
                  {f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]} if chains else {}))

    lazy: list[str] = []
    downloaded: list[str] = []
    present: list[str] = []
    with containerd.lease():
        for data, d, labels in blobs:
            kind: Kind = ("config" if d == manifest.config.digest else
                          "manifest" if d == manifest_digest else "index")
            if containerd.has_content(d):
                if labels:
                    containerd.set_content_labels(d, labels)
            else:
                containerd.write_content(d, len(data), [data], labels)
            progress(ProgressEvent(row_key(kind, d), kind, "done", len(data), len(data)))
        parent = ""
        for i, (layer, diff_id, chain) in enumerate(zip(manifest.layers, diff_ids, chains)):
            key = row_key("layer", layer.digest)
            if containerd.stat_snapshot(snapshotter, chain):
                present.append(layer.digest)
                progress(ProgressEvent(key, "layer", "exists", layer.size, layer.size))
                parent = chain
                continue
            labels = {LABEL_TARGET: chain, LABEL_IMAGE_REF: str(reference),
                      LABEL_MANIFEST_DIGEST: manifest_digest, LABEL_LAYER_DIGEST: layer.digest,
                      LABEL_IMAGE_LAYERS: _layers_label(manifest.layers[i:])}
            extract = f"extract-{uuid.uuid4().hex} {chain}"
            try:
                mounts = containerd.prepare(snapshotter, extract, parent, labels)
            except SnapshotExistsError:        # a remote snapshot: served lazily, nothing to download
                lazy.append(layer.digest)
                progress(ProgressEvent(key, "layer", "mounted", 0, layer.size))
                parent = chain
                continue
            try:
                _download(registry, containerd, reference, layer, diff_id, progress)
                got = containerd.apply(layer.media_type, layer.digest, layer.size, mounts)
                if got != diff_id:
                    raise IntegrityError(f"layer {layer.digest} unpacks to {got}, the image config says {diff_id}",
                                         expected=diff_id, actual=got)
                containerd.commit(snapshotter, chain, extract, labels)
            except BaseException:
                try:
                    containerd.remove(snapshotter, extract)
                except LazyociError:
                    pass
                raise
            downloaded.append(layer.digest)
            progress(ProgressEvent(key, "layer", "done", layer.size, layer.size))
            parent = chain
        name = str(reference)
        containerd.put_image(name, top[0], top[1], top[2], {})
    return ContainerdPull(name, chains[-1] if chains else "", tuple(lazy), tuple(downloaded), tuple(present))


def _download(registry: RegistryClient, containerd: ContainerdClient, reference: Reference, layer: Descriptor,
              diff_id: str, progress: ProgressSink) -> None:
    """The layer into containerd's content store (unless there), with its diff ID as label."""
    key = row_key("layer", layer.digest)
    labels = {"containerd.io/uncompressed": diff_id}
    if containerd.has_content(layer.digest):
        containerd.set_content_labels(layer.digest, labels)
        return
    done = 0

    def chunks():
        nonlocal done
        for chunk in registry.iter_blob(reference, layer.digest, layer.size):
            done += len(chunk)
            progress(ProgressEvent(key, "layer", "downloading", done, layer.size))
            yield chunk

    containerd.write_content(layer.digest, layer.size, chunks(), labels)


