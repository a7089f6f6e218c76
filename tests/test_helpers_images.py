"""The test image helpers themselves: skopeo pushes what we built, byte for byte."""

import json
import subprocess

from helpers.images import Entry, image_config, make_layer, push_image


def test_skopeo_push_preserves_digests(registry, tmp_path):
    layer = make_layer([Entry("etc", "dir"), Entry("etc/hello", data=b"hi\n")])
    cfg = image_config([layer], cmd=["/bin/true"])
    digest = push_image(registry.host, "helpers/check", [layer], cfg, tmp_path)
    out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                          f"docker://{registry.host}/helpers/check:latest"],
                         check=True, capture_output=True).stdout
    assert json.loads(out)["layers"][0]["digest"] == layer.digest
    import hashlib
    assert "sha256:" + hashlib.sha256(out).hexdigest() == digest
