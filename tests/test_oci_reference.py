import pytest

from lazyoci.errors import ReferenceError_
from lazyoci.oci import Reference, chain_ids, Platform
from lazyoci.oci.reference import is_loopback_registry


@pytest.mark.parametrize("text,expected", [
    ("ubuntu", "docker.io/library/ubuntu:latest"),
    ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
    ("user/app", "docker.io/user/app:latest"),
    ("docker.io/ubuntu", "docker.io/library/ubuntu:latest"),
    ("index.docker.io/library/ubuntu", "docker.io/library/ubuntu:latest"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/a/b:v1", "localhost:5000/a/b:v1"),
    ("127.0.0.1:5000/app@sha256:" + "a" * 64, "127.0.0.1:5000/app@sha256:" + "a" * 64),
    ("ghcr.io/o/r:t@sha256:" + "b" * 64, "ghcr.io/o/r:t@sha256:" + "b" * 64),
    ("[::1]:5000/app", "[::1]:5000/app:latest"),
])
def test_parse_normalises_like_docker(text, expected):
    assert str(Reference.parse(text)) == expected


@pytest.mark.parametrize("text", [
    "", "UPPER", "a b", "app:", "app@sha256:xyz", "app:bad!tag", "-app", "a//b", " app",
    "localhost:5000/", "app:" + "t" * 200,
])
def test_malformed_references_are_rejected(text):
    with pytest.raises(ReferenceError_):
        Reference.parse(text)


def test_familiar_and_object():
    r = Reference.parse("ubuntu")
    assert r.familiar() == "ubuntu:latest"
    assert r.object == "latest"
    assert r.api_host == "registry-1.docker.io"
    assert Reference.parse("localhost:5000/x").api_host == "localhost:5000"


def test_loopback_detection():
    assert is_loopback_registry("localhost:5000")
    assert is_loopback_registry("127.0.0.1:1234")
    assert is_loopback_registry("[::1]:5000")
    assert not is_loopback_registry("example.com:5000")


def test_chain_ids():
    a, b = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    ids = chain_ids([a, b])
    assert ids[0] == a
    import hashlib
    assert ids[1] == "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()


def test_platform_parse_and_match():
    p = Platform.parse("linux/amd64")
    assert p.matches(Platform("linux", "amd64"))
    assert not p.matches(Platform("linux", "arm64", "v8"))
    assert Platform.parse("linux/arm64").matches(Platform("linux", "arm64", "v8"))
