"""`images --filter` / `image ls --filter` with docker's keys, over images pulled from the real registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.images import Entry, image_config, make_layer, push_image

pytestmark = pytest.mark.needs_root("pulls unpack layers owned by root")
LAZYOCI = str(Path(sys.executable).parent / "lazyoci")


def _lz(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([LAZYOCI, "--root", str(root), *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"lazyoci {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


def _push(registry, repo: str, created: str, labels: dict[str, str], work: Path) -> str:
    layer = make_layer([Entry(f"{repo.replace('/', '-')}.txt", data=repo.encode())])
    cfg = json.loads(image_config([layer]))
    cfg["created"] = created
    cfg["config"]["Labels"] = labels
    push_image(registry.host, repo, [layer], json.dumps(cfg).encode(), work)
    return f"{registry.host}/{repo}:latest"


@pytest.fixture(scope="module")
def images(registry, tmp_path_factory):
    """old (2024, label tier=base), mid (2025, tier=app, team=x), new (2026, no label) and an
    unnamed copy of mid, in one data root."""
    work = tmp_path_factory.mktemp("filters")
    root = work / "root"
    refs = {
        "old": _push(registry, "filter/old", "2024-01-01T00:00:00Z", {"tier": "base"}, work),
        "mid": _push(registry, "filter/mid", "2025-01-01T00:00:00Z", {"tier": "app", "team": "x"}, work),
        "new": _push(registry, "filter/new", "2026-01-01T00:00:00Z", {}, work),
    }
    for ref in refs.values():
        _lz(root, "pull", "-q", ref)
    _lz(root, "tag", refs["mid"], "filter/dangling-soon:1")
    return root, refs, registry.host


def _names(root: Path, *filters: str, command: tuple[str, ...] = ("images",)) -> list[str]:
    args = [*command, "--format", "json"]
    for f in filters:
        args += ["--filter", f]
    return sorted(json.loads(l)["Repository"] for l in _lz(root, *args).stdout.splitlines())


def test_each_filter_key(images):
    root, refs, host = images
    old, mid, new = (f"{host}/filter/{n}" for n in ("old", "mid", "new"))
    assert _names(root, "label=tier") == sorted([old, mid, "filter/dangling-soon"])
    assert _names(root, "label=tier=app") == sorted([mid, "filter/dangling-soon"])
    assert _names(root, "label=tier=app", "label=tier=base") == sorted([old, mid, "filter/dangling-soon"])
    assert _names(root, "label=tier=app", "label=team=y") == sorted([mid, "filter/dangling-soon"])   # OR
    assert _names(root, "before=" + refs["new"]) == sorted([old, mid, "filter/dangling-soon"])
    assert _names(root, "since=" + refs["old"]) == sorted([mid, new, "filter/dangling-soon"])
    assert _names(root, "since=" + refs["old"], "before=" + refs["new"]) == sorted([mid, "filter/dangling-soon"])
    assert _names(root, "reference=filter/*") == ["filter/dangling-soon"]
    assert _names(root, f"reference={host}/filter/*") == sorted([old, mid, new])
    assert _names(root, f"reference={host}/*/o*:latest") == [old]
    assert _names(root, "reference=*") == []          # `*` does not cross a `/`
    assert _names(root, "dangling=false") == sorted([old, mid, new, "filter/dangling-soon"])
    assert _names(root, "dangling=true") == []
    assert _names(root, "label=tier=app", "reference=filter/*",
                  command=("image", "ls")) == ["filter/dangling-soon"]   # AND across keys


def test_dangling_is_an_image_without_a_name(images, registry, tmp_path):
    """An OCI archive without names loads as <none>: dangling=true finds only it."""
    root, _refs, host = images
    ref = _push(registry, "filter/unnamed", "2023-01-01T00:00:00Z", {}, tmp_path)
    archive = tmp_path / "unnamed.tar"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci-archive:{archive}"],
                   check=True, capture_output=True)
    loaded = _lz(root, "load", "-i", str(archive)).stdout
    top = loaded.split("Loaded image: ")[1].strip()
    r = _lz(root, "images", "--format", "json", "--filter", "dangling=true")
    assert [(json.loads(l)["Repository"], json.loads(l)["Digest"]) for l in r.stdout.splitlines()] == [("<none>", top)]
    assert _lz(root, "images", "-q", "-f", "dangling=true").stdout.split() == [top[7:19]]
    assert top[7:19] not in _lz(root, "images", "-q", "--filter", "dangling=false").stdout
    _lz(root, "rmi", top)


def test_bad_filters_are_one_line_errors(images):
    root, _refs, _host = images
    for bad, words in (("nope=1", "invalid filter 'nope'"), ("dangling", "expected name=value"),
                       ("dangling=maybe", "true or false"), ("before=no/such:image", "no such image"),
                       ("label=", "label"), ("reference=", "needs a value")):
        r = _lz(root, "images", "--filter", bad, check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, (bad, r.stderr)
