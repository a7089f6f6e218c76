"""The lazy pull's seams: a soci snapshotter made from the collaborators it is given, a tag
resolved once per pull, and INFO lines that reach the caller's callback and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.fault_proxy import FaultProxy
from helpers.images import Entry, image_config, make_layer, push_image
from helpers.lazy import push_soci_index, write_config
from helpers.tricky_image import push_tricky_image
from lazyoci.config import load_config
from lazyoci.errors import ConfigError
from lazyoci.images.service import ImageService
from lazyoci.registry import RegistryClient, RegistryOptions
from lazyoci.service.client import ServiceClient
from lazyoci.snapshot.soci import SociSnapshotter
from lazyoci.store.db import Database
from lazyoci.store.layout import DataRoot
from lazyoci.store.lazy_layer_records import LazyLayerRecords

pytestmark = pytest.mark.needs_root("FUSE and overlay")


def _indexed_image(registry, data_root, tmp_path, repo: str) -> tuple[str, Path, DataRoot, ImageService, ServiceClient]:
    """The tricky image pushed to `repo` with a SOCI index; (index digest, config path, data root,
    image service, service client) of a lazy pull of it."""
    push_tricky_image(registry.host, repo, tmp_path)
    index = push_soci_index(registry.host, repo, tmp_path)
    config = write_config(tmp_path / "config.yaml")
    root = DataRoot(data_root)
    return index, config, root, ImageService(root), ServiceClient(root, config)


def test_a_lazy_pull_asks_the_registry_for_the_tag_once(registry, data_root, tmp_path):
    """The lazy pull resolves the tag to find the index; the image is then fetched as resolved."""
    _, config, root, images, server = _indexed_image(registry, data_root, tmp_path, "seams/once")
    try:
        with FaultProxy(registry.host) as proxy:
            snap = SociSnapshotter(root, load_config(config), client=images.client)
            image = snap.pull(images, f"{proxy.host}/seams/once:latest")
            assert image.snapshotter == "soci"
            assert proxy.count("GET", match="/manifests/latest") == 1, [r.path for r in proxy.log]
            assert proxy.count("HEAD", match="/manifests/latest") == 0
    finally:
        images.close()
        server.stop()


def test_an_index_given_by_digest_is_asked_for_beside_the_tag(registry, data_root, tmp_path):
    """`--soci-index-digest`: the index needs nothing from the tag, so it is requested at once,
    not a round trip later. Here the tag is not found, and the index was asked for all the same."""
    from lazyoci.errors import NotFoundError
    from helpers.fault_proxy import Fault

    index, config, root, images, server = _indexed_image(registry, data_root, tmp_path, "seams/beside")
    try:
        with FaultProxy(registry.host) as proxy:
            proxy.add(Fault("status", status=404, match="/manifests/latest", method="GET"))
            snap = SociSnapshotter(root, load_config(config), client=images.client)
            with pytest.raises(NotFoundError):
                snap.pull(images, f"{proxy.host}/seams/beside:latest", index_digest=index)
            assert proxy.count("GET", match=f"/manifests/{index}") == 1, [r.path for r in proxy.log]
            assert proxy.count("GET", match="/blobs/") == 0          # nothing else before the tag's answer
            proxy.clear()
            image = snap.pull(images, f"{proxy.host}/seams/beside:latest", index_digest=index)
            assert image.snapshotter == "soci"
            assert proxy.count("GET", match=f"/blobs/{image.manifest.config.digest}") == 1
    finally:
        images.close()
        server.stop()


def test_the_soci_snapshotter_works_with_the_collaborators_it_is_given(registry, data_root, tmp_path):
    """Records, layer server and registry client injected: the lazy pull resolves and discovers
    through the given client (here one whose mirror bypasses the proxy the image service uses),
    and fetches the image's config through it beside the index."""
    push_tricky_image(registry.host, "seams/injected", tmp_path)
    push_soci_index(registry.host, "seams/injected", tmp_path)
    config = write_config(tmp_path / "config.yaml")
    root = DataRoot(data_root).ensure()
    images = ImageService(root)
    server = ServiceClient(root, config)
    records = LazyLayerRecords(Database(root.db_path))
    try:
        with FaultProxy(registry.host) as proxy:
            client = RegistryClient(RegistryOptions(mirrors={proxy.host: (f"http://{registry.host}",)}))
            try:
                snap = SociSnapshotter(root, load_config(config), server=server, records=records, client=client)
                image = snap.pull(images, f"{proxy.host}/seams/injected:latest")
            finally:
                client.close()
            assert image.snapshotter == "soci"
            assert proxy.count("GET", match="/manifests/") == 0, [r.path for r in proxy.log]
            # every layer is lazy: nothing left for the image service (the service's Range
            # requests for the layers' first headers go to the image's own registry)
            assert not [r.path for r in proxy.log if "/blobs/" in r.path and r.range is None]
        assert all(records.layer(l.digest) is not None for l in image.manifest.layers)
        assert snap.is_lazy(snap.unpack_image(None, image))
    finally:
        images.close()
        server.stop()


def test_a_soci_snapshotter_made_without_a_registry_client_refuses_to_pull(registry, data_root, tmp_path):
    """The registry client is a collaborator given at construction, never the image service's
    taken behind the caller's back: without one, a lazy pull fails before any request."""
    push_tricky_image(registry.host, "seams/noclient", tmp_path)
    push_soci_index(registry.host, "seams/noclient", tmp_path)
    config = write_config(tmp_path / "config.yaml")
    root = DataRoot(data_root).ensure()
    images = ImageService(root)
    try:
        with FaultProxy(registry.host) as proxy:
            snap = SociSnapshotter(root, load_config(config))
            with pytest.raises(ConfigError, match="without a registry client"):
                snap.pull(images, f"{proxy.host}/seams/noclient:latest")
            assert proxy.log == []
        assert images.list() == []
    finally:
        images.close()


def test_a_fallback_is_said_through_the_callback_and_never_printed(registry, data_root, tmp_path, capfd):
    layer = make_layer([Entry("hello.txt", data=b"no index here\n")])
    push_image(registry.host, "seams/quiet", [layer], image_config([layer]), tmp_path)
    config = write_config(tmp_path / "config.yaml")
    root = DataRoot(data_root)
    images = ImageService(root)
    snap = SociSnapshotter(root, load_config(config), client=images.client)
    lines: list[str] = []
    try:
        image = snap.pull(images, f"{registry.host}/seams/quiet:latest", log=lines.append)
        assert image.snapshotter == "overlayfs"
        assert len(lines) == 1 and "no SOCI index" in lines[0], lines
        snap.pull(images, f"{registry.host}/seams/quiet:latest")     # no callback: said to no one
        out, err = capfd.readouterr()
        assert "INFO" not in out and "INFO" not in err, (out, err)
    finally:
        images.close()
