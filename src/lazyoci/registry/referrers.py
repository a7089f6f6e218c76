"""Referrers: the OCI referrers API, and the tag schema for registries without it.

A registry that implements OCI distribution 1.1 lists the manifests whose
`subject` is a digest at `GET /v2/<name>/referrers/<digest>`. Older ones
(docker-registry 2.8 answers 404) use the referrers tag schema instead: an OCI
index tagged `<alg>-<hex>` of the subject, which pushers read-modify-write.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lazyoci.errors import FormatError, NotFoundError
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.digest import Digest
from lazyoci.oci.manifest import Descriptor, Index, canonical_json
from lazyoci.oci.reference import Reference
from lazyoci.registry.auth import pull_scope
from lazyoci.registry.transport import raise_for_status

_MAX_PAGES = 100

if TYPE_CHECKING:
    from lazyoci.registry.client import RegistryClient


def referrers_tag(subject_digest: str) -> str:
    """The tag schema's tag: `sha256:<hex>` -> `sha256-<hex>` (at most 128 characters, per spec)."""
    d = Digest.parse(subject_digest)
    return f"{d.algorithm}-{d.hex}"[:128]


def _filter(descs: list[Descriptor], artifact_type: str | None) -> list[Descriptor]:
    if artifact_type is None:
        return descs
    return [d for d in descs if d.artifact_type == artifact_type]


def api_referrers(client: "RegistryClient", ref: Reference, subject_digest: str,
                  artifact_type: str | None) -> list[Descriptor] | None:
    """The referrers API's answer, or None when the registry does not implement it (404)."""
    Digest.parse(subject_digest)
    params = {"artifactType": artifact_type} if artifact_type else None
    scopes = (pull_scope(ref.repository),)
    what = f"referrers of {subject_digest} in {ref.name}"
    ep, resp = client.transport.send(
        ref.registry, "GET", f"/v2/{ref.repository}/referrers/{subject_digest}",
        scopes=scopes, headers={"Accept": mt.OCI_INDEX}, params=params, mirrors=True)
    if resp.status_code == 404:
        resp.close()
        return None
    descs: list[Descriptor] = []
    for _ in range(_MAX_PAGES):
        raise_for_status(resp, what)
        index = Index.parse(resp.content, mt.OCI_INDEX)
        # The registry may ignore the filter; it says so by leaving out OCI-Filters-Applied.
        applied = resp.headers.get("oci-filters-applied", "")
        page = list(index.manifests)
        descs += page if "artifactType" in applied else _filter(page, artifact_type)
        following = resp.links.get("next", {}).get("url")
        if not following:
            return descs
        resp = client.transport.request(ep, "GET", str(resp.url.join(following)), scopes=scopes,
                                        headers={"Accept": mt.OCI_INDEX})
    raise FormatError(f"{what}: more than {_MAX_PAGES} pages")


def tag_schema_referrers(client: "RegistryClient", ref: Reference, subject_digest: str,
                         artifact_type: str | None) -> list[Descriptor]:
    try:
        raw, media_type, _ = client.get_manifest(ref.with_tag(referrers_tag(subject_digest)))
    except NotFoundError:
        return []
    if media_type not in mt.IMAGE_INDEXES:
        raise FormatError(f"{ref.name}:{referrers_tag(subject_digest)} is a {media_type}, "
                          "not the referrers index the tag schema expects")
    return _filter(list(Index.parse(raw, media_type).manifests), artifact_type)


def referrers(client: "RegistryClient", ref: Reference, subject_digest: str,
              artifact_type: str | None = None) -> list[Descriptor]:
    found = api_referrers(client, ref, subject_digest, artifact_type)
    if found is not None:
        return found
    return tag_schema_referrers(client, ref, subject_digest, artifact_type)


def add_referrer(client: "RegistryClient", ref: Reference, subject_digest: str,
                 descriptor: Descriptor) -> None:
    """Make `descriptor` (a manifest whose subject is `subject_digest`) listed as a referrer.

    Nothing to do when the registry acknowledged the subject (OCI-Subject header on the
    manifest PUT) or its referrers API already lists it; otherwise the tag schema index is
    read, deduplicated by digest, extended and written back. Concurrent writers to the same
    subject can still race (the tag schema has no compare-and-swap); the last writer wins."""
    if client.subject_acknowledged(ref, descriptor.digest):
        return
    listed = api_referrers(client, ref, subject_digest, None)
    if listed is not None and any(d.digest == descriptor.digest for d in listed):
        return
    tag_ref = ref.with_tag(referrers_tag(subject_digest))
    doc: dict[str, Any] = {}
    try:
        raw, media_type, _ = client.get_manifest(tag_ref)
        doc = json.loads(raw)
        if media_type not in mt.IMAGE_INDEXES or not isinstance(doc, dict):
            raise FormatError(f"{tag_ref} exists but is not a referrers index ({media_type})")
    except NotFoundError:
        pass
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for entry in doc.get("manifests") or []:
        digest = entry.get("digest") if isinstance(entry, dict) else None
        if not digest or digest in seen or digest == descriptor.digest:
            continue
        seen.add(digest)
        entries.append(entry)
    entries.append(descriptor.to_json())
    doc.update({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": entries})
    client.put_manifest(tag_ref, canonical_json(doc), mt.OCI_INDEX)
