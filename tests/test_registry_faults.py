"""Registry faults injected by a loopback proxy in front of the real docker-registry."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from helpers.fault_proxy import Fault, FaultProxy
from lazyoci.errors import (AuthError, IntegrityError, NotFoundError, RangeNotSupportedError,
                            RegistryError)
from lazyoci.oci import mediatypes as mt
from lazyoci.oci.manifest import canonical_json
from lazyoci.oci.reference import Reference
from lazyoci.registry import RegistryClient, RegistryOptions
from lazyoci.registry.transport import mirror_endpoints, upstream_endpoints


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


BLOB = os.urandom(2 * 1024 * 1024 + 17)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """The retry policy is the real one, only with shorter pauses (the suite has a time budget)."""
    monkeypatch.setattr("lazyoci.registry.transport._BASE_BACKOFF", 0.02)


@pytest.fixture(scope="module")
def seeded(registry, tmp_path_factory):
    """A repository holding BLOB and a manifest (pushed directly, without the proxy)."""
    ref = Reference.parse(f"{registry.host}/faults/app:v1")
    with RegistryClient(RegistryOptions(docker_config=tmp_path_factory.mktemp("cfg") / "c.json")) as c:
        c.push_blob(ref, sha(BLOB), len(BLOB), lambda: io.BytesIO(BLOB))
        cfg = b"{}"
        c.push_blob(ref, sha(cfg), 2, lambda: io.BytesIO(cfg))
        raw = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                              "config": {"mediaType": mt.OCI_CONFIG, "digest": sha(cfg), "size": 2},
                              "layers": [{"mediaType": mt.OCI_LAYER_TAR, "digest": sha(BLOB), "size": len(BLOB)}]})
        c.put_manifest(ref, raw, mt.OCI_MANIFEST)
    return raw


@pytest.fixture
def proxy(registry, seeded):
    with FaultProxy(registry.host) as p:
        yield p


@pytest.fixture
def client(tmp_path):
    with RegistryClient(RegistryOptions(docker_config=tmp_path / "c.json", max_retries=2)) as c:
        yield c


def ref_via(proxy: FaultProxy) -> Reference:
    return Reference.parse(f"{proxy.host}/faults/app:v1")


@pytest.mark.parametrize("kind", ["reset", "close"])
def test_cut_mid_blob_resumes_with_range(proxy, client, kind):
    proxy.add(Fault(kind, match="/blobs/", method="GET", at=700_000))
    got = b"".join(client.iter_blob(ref_via(proxy), sha(BLOB), len(BLOB)))
    assert got == BLOB
    gets = [r for r in proxy.log if r.method == "GET" and "/blobs/" in r.path]
    assert len(gets) == 2 and gets[0].fault == kind
    # Resumed where the stream broke: only the missing part was sent again.
    assert gets[1].range == "bytes=700000-" and gets[1].bytes_sent == len(BLOB) - 700_000


def test_resets_every_time_give_up_with_clear_error(proxy, client):
    proxy.add(Fault("reset", match="/blobs/", method="GET", times=None, at=0))
    with pytest.raises(RegistryError, match="connection lost"):
        list(client.iter_blob(ref_via(proxy), sha(BLOB), len(BLOB)))


def test_resume_against_server_ignoring_range(proxy, client):
    """After a reset the server answers 200 to the Range: the client skips what it already has."""
    proxy.add(Fault("reset", match="/blobs/", method="GET", at=1_000_000))
    proxy.add(Fault("ignore_range", match="/blobs/", times=None))
    assert b"".join(client.iter_blob(ref_via(proxy), sha(BLOB), len(BLOB))) == BLOB


def test_corrupt_blob_is_an_integrity_error(proxy, client):
    proxy.add(Fault("corrupt", match="/blobs/", method="GET"))
    with pytest.raises(IntegrityError, match="digest mismatch"):
        list(client.iter_blob(ref_via(proxy), sha(BLOB), len(BLOB)))
    # The next read (fault spent) is fine.
    assert b"".join(client.iter_blob(ref_via(proxy), sha(BLOB), len(BLOB))) == BLOB


def test_truncated_blob_is_an_integrity_error(proxy, client):
    proxy.add(Fault("truncate", match="/blobs/", method="GET"))
    with pytest.raises(IntegrityError, match="truncated"):
        list(client.iter_blob(ref_via(proxy), sha(BLOB), len(BLOB)))


def test_corrupt_manifest_is_refused(proxy, client, seeded):
    ref = ref_via(proxy)
    proxy.add(Fault("corrupt", match="/manifests/", method="GET", at=5))
    with pytest.raises(IntegrityError):
        client.get_manifest(ref.with_digest(sha(seeded)))
    proxy.add(Fault("corrupt", match="/manifests/", method="GET", at=5))
    with pytest.raises(IntegrityError):   # by tag: the bytes disagree with Docker-Content-Digest
        client.get_manifest(ref)


@pytest.mark.parametrize("status,error,text", [
    (401, AuthError, "authentication required"),
    (403, AuthError, "requested access to the resource is denied"),
    (404, NotFoundError, "manifest unknown"),
])
def test_auth_and_not_found_errors(proxy, client, status, error, text):
    proxy.add(Fault("status", status=status, message=text, match="/manifests/", times=None))
    with pytest.raises(error, match=text) as e:
        client.get_manifest(ref_via(proxy))
    assert e.value.status == status
    with pytest.raises(error):
        client.resolve(ref_via(proxy))


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_errors_retried_then_succeed(proxy, client, seeded, status):
    proxy.add(Fault("status", status=status, match="/manifests/", method="GET", times=2,
                    headers={"Retry-After": "0"} if status == 429 else {}))
    raw, _, _ = client.get_manifest(ref_via(proxy))
    assert raw == seeded
    assert proxy.count("GET", "/manifests/", status=status) == 2
    proxy.add(Fault("status", status=status, match="/blobs/", method="GET", times=1))
    assert b"".join(client.iter_blob(ref_via(proxy), sha(BLOB), len(BLOB))) == BLOB


def test_persistent_500_gives_up(proxy, client):
    proxy.add(Fault("status", status=500, match="/manifests/", times=None, message="storage on fire"))
    with pytest.raises(RegistryError, match="storage on fire") as e:
        client.get_manifest(ref_via(proxy))
    assert e.value.status == 500
    assert proxy.count("GET", "/manifests/") == 3        # max_retries=2: three attempts


def test_range_ignored_is_reported(proxy, client):
    ref = ref_via(proxy)
    assert client.fetch_range(ref, sha(BLOB), 100, 200) == BLOB[100:200]
    proxy.add(Fault("ignore_range", match="/blobs/"))
    with pytest.raises(RangeNotSupportedError, match="ignored the Range request"):
        client.fetch_range(ref, sha(BLOB), 100, 200)


def test_several_ranges_come_in_one_request_in_the_order_asked(proxy, client):
    """The registry answers multipart/byteranges; each range's bytes come out of their part."""
    ranges = [(1_500_000, 1_600_000), (7, 5000), (2 * 1024 * 1024, len(BLOB)), (900_000, 900_001)]
    got = client.fetch_ranges(ref_via(proxy), sha(BLOB), ranges)
    assert got == [BLOB[s:e] for s, e in ranges]
    gets = [r for r in proxy.log if r.method == "GET" and "/blobs/" in r.path]
    assert len(gets) == 1 and gets[0].range == "bytes=1500000-1599999,7-4999,2097152-2097168,900000-900000"


@pytest.mark.parametrize("kind", ["ignore_range", "first_range"])
def test_a_registry_serving_one_range_per_request_is_asked_so_from_then_on(proxy, client, kind):
    """The whole blob (200) or one part (206 of the first range): None, the body left unread, and
    the client asks that registry for one range per request from then on (no more tries)."""
    ref = ref_via(proxy)
    proxy.add(Fault(kind, match="/blobs/", times=None))
    assert client.fetch_ranges(ref, sha(BLOB), [(0, 100), (5000, 6000)]) is None
    assert proxy.count("GET", "/blobs/") == 1
    assert client.fetch_ranges(ref, sha(BLOB), [(0, 100), (5000, 6000)]) is None
    assert proxy.count("GET", "/blobs/") == 1
    proxy.clear()
    assert client.fetch_range(ref, sha(BLOB), 5000, 6000) == BLOB[5000:6000]


def test_a_truncated_multipart_answer_gives_no_bytes_and_one_range_per_request_from_then_on(proxy, client, caplog):
    """A registry that mangles several ranges still serves them one by one: nothing of its answer
    is returned, the reason is logged, and it is not asked for several ranges again."""
    ref = ref_via(proxy)
    proxy.add(Fault("truncate", match="/blobs/", method="GET", times=None, at=150_000))
    with caplog.at_level("WARNING", logger="lazyoci.registry.download"):
        assert client.fetch_ranges(ref, sha(BLOB), [(0, 100_000), (200_000, 300_000)]) is None
    assert "the multipart answer is truncated or malformed; asking for one range per request" in caplog.text
    assert client.fetch_ranges(ref, sha(BLOB), [(0, 100_000), (200_000, 300_000)]) is None
    assert proxy.count("GET", "/blobs/") == 1
    proxy.clear()
    assert client.fetch_range(ref, sha(BLOB), 200_000, 300_000) == BLOB[200_000:300_000]


def test_range_read_retried_after_reset(proxy, client):
    proxy.add(Fault("reset", match="/blobs/", method="GET", at=10))
    assert client.fetch_range(ref_via(proxy), sha(BLOB), 5000, 105_000) == BLOB[5000:105_000]


def test_a_streamed_range_starts_its_sink_over_after_a_reset_and_a_sink_error_ends_it(proxy, client):
    proxy.add(Fault("reset", match="/blobs/", method="GET", at=60_000))
    sinks: list[list[bytes]] = []

    def begin():
        sinks.append([])
        return sinks[-1].append

    client.stream_range(ref_via(proxy), sha(BLOB), 5000, 305_000, begin)
    assert len(sinks) == 2, "the reset attempt and the one after it"
    assert sum(map(len, sinks[0])) < 300_000, "the first attempt ended early (what reached us before the reset varies)"
    assert b"".join(sinks[1]) == BLOB[5000:305_000]

    class Refused(IntegrityError):
        pass

    def refusing(chunk: bytes) -> None:
        raise Refused("not these bytes")

    # counted by the sinks asked for, not by the proxy, whose record of the reset request above
    # may land after a reset of its counters
    begun: list[int] = []

    def begin_refusing():
        begun.append(1)
        return refusing

    proxy.clear()
    with pytest.raises(Refused):
        client.stream_range(ref_via(proxy), sha(BLOB), 5000, 305_000, begin_refusing)
    assert len(begun) == 1, "a sink's error is not retried"


def test_push_retried_after_500(registry, client):
    with FaultProxy(registry.host) as proxy:
        ref = Reference.parse(f"{proxy.host}/faults/push:v1")
        data = os.urandom(10_000)
        proxy.add(Fault("status", status=500, match="/blobs/uploads/", method="PUT"))
        assert client.push_blob(ref, sha(data), len(data), lambda: io.BytesIO(data)) == "pushed"
        assert client.blob_exists(ref, sha(data))


def test_mirror_tried_first_then_upstream(registry, seeded, tmp_path, fresh_registry):
    """An empty mirror (404) and a dead one fall back to the upstream; a mirror with content serves it."""
    ref = Reference.parse(f"{registry.host}/faults/app:v1")
    with FaultProxy(fresh_registry.host) as empty_mirror:
        opts = RegistryOptions(docker_config=tmp_path / "c.json", mirrors={
            registry.host: ("http://127.0.0.1:9/dead", f"{empty_mirror.url}/v2")})
        with RegistryClient(opts) as c:
            raw, _, _ = c.get_manifest(ref)
            assert raw == seeded
            assert b"".join(c.iter_blob(ref, sha(BLOB), len(BLOB))) == BLOB
            assert empty_mirror.count("GET", "/v2/faults/app/manifests/v1?ns=") == 1
    with FaultProxy(registry.host) as mirror:
        opts = RegistryOptions(docker_config=tmp_path / "c.json",
                               mirrors={"other.example:5000": (mirror.url,)})
        with RegistryClient(opts) as c:
            mref = Reference.parse("other.example:5000/faults/app:v1")
            assert c.get_manifest(mref)[0] == seeded      # served by the mirror alone
            assert c.fetch_range(mref, sha(BLOB), 1, 3) == BLOB[1:3]
            assert mirror.count("GET") == 2


def test_endpoint_choice():
    opts = RegistryOptions(insecure_registries=("reg.lan:5000",),
                           mirrors={"docker.io": ("https://cache.lan/dockerhub/v2/",)})
    assert [e.base for e in upstream_endpoints("127.0.0.1:5000", opts)] == ["http://127.0.0.1:5000"]
    assert [e.base for e in upstream_endpoints("localhost:5000", opts)] == ["http://localhost:5000"]
    assert [e.base for e in upstream_endpoints("[::1]:5000", opts)] == ["http://[::1]:5000"]
    insecure = upstream_endpoints("reg.lan:5000", opts)
    assert [(e.base, e.verify_tls) for e in insecure] == [("https://reg.lan:5000", False),
                                                          ("http://reg.lan:5000", False)]
    hub = upstream_endpoints("docker.io", opts)
    assert [(e.base, e.verify_tls, e.cred_key) for e in hub] == [("https://registry-1.docker.io", True, "docker.io")]
    (m,) = mirror_endpoints("docker.io", opts)
    assert (m.base, m.host, m.namespace, m.verify_tls) == ("https://cache.lan/dockerhub", "cache.lan", "docker.io", True)
    assert mirror_endpoints("quay.io", opts) == []
    with pytest.raises(RegistryError):
        mirror_endpoints("docker.io", RegistryOptions(mirrors={"docker.io": ("cache.lan",)}))


def test_insecure_registry_falls_back_to_http(registry, seeded, tmp_path):
    """A non-loopback name (0.0.0.0 reaches the loopback listener) needs --insecure-registry for HTTP."""
    port = registry.host.rsplit(":", 1)[1]
    ref = Reference.parse(f"0.0.0.0:{port}/faults/app:v1")
    with RegistryClient(RegistryOptions(docker_config=tmp_path / "c.json", max_retries=0)) as strict:
        with pytest.raises(RegistryError, match="cannot reach registry"):
            strict.get_manifest(ref)
    opts = RegistryOptions(docker_config=tmp_path / "c.json", insecure_registries=(f"0.0.0.0:{port}",))
    with RegistryClient(opts) as c:
        assert c.get_manifest(ref)[0] == seeded          # HTTPS failed, plain HTTP answered
        assert c.transport.upstream(ref.registry)[0].base == f"http://0.0.0.0:{port}"   # remembered
