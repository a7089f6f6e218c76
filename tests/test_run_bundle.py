"""Runtime bundles without running anything: docker's override rules, user and file resolution."""

from __future__ import annotations

import json

import pytest

from lazyoci.errors import ConfigError, ContainerError
from lazyoci.oci.manifest import ImageConfig
from lazyoci.runtime.bundle import ProcessOptions, build_spec, merge_env, process_args


def _config(**cfg) -> ImageConfig:
    return ImageConfig.parse(json.dumps({"os": "linux", "architecture": "amd64", "config": cfg,
                                         "rootfs": {"type": "layers", "diff_ids": []}}).encode())


def test_docker_override_rules_for_the_command():
    cfg = _config(Entrypoint=["/ep", "x"], Cmd=["c1", "c2"])
    assert process_args(cfg, ProcessOptions()) == ["/ep", "x", "c1", "c2"]
    assert process_args(cfg, ProcessOptions(args=("a",))) == ["/ep", "x", "a"]
    assert process_args(cfg, ProcessOptions(entrypoint="/other")) == ["/other"]          # clears Cmd
    assert process_args(cfg, ProcessOptions(entrypoint="/other", args=("a",))) == ["/other", "a"]
    assert process_args(cfg, ProcessOptions(entrypoint="", args=("/bin/x",))) == ["/bin/x"]
    with pytest.raises(ContainerError, match="no command"):
        process_args(_config(), ProcessOptions())


def test_env_merge(monkeypatch):
    monkeypatch.setenv("FROM_HOST", "h")
    monkeypatch.delenv("NOT_SET", raising=False)
    env = merge_env(("A=1", "B=2", "NOT_SET=image"), ("B=3", "FROM_HOST", "NOT_SET", "C=x=y"))
    assert env == ["A=1", "B=3", "FROM_HOST=h", "C=x=y",
                   "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    with pytest.raises(ConfigError):
        merge_env((), ("=bad",))


def test_spec_shares_the_host_network_and_mounts_etc_files(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    spec = build_spec(_config(Cmd=["/bin/sh"], WorkingDir="/w"), root, tmp_path / "etc", ProcessOptions(tty=True))
    assert "network" not in [n["type"] for n in spec["linux"]["namespaces"]]
    dests = {m["destination"]: m for m in spec["mounts"]}
    for f in ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/proc", "/dev", "/sys"):
        assert f in dests
    assert "localhost" in (tmp_path / "etc/hosts").read_text()
    assert spec["process"]["terminal"] is True and spec["process"]["cwd"] == "/w"
    assert "HOME=/root" in spec["process"]["env"] and "TERM=xterm" in spec["process"]["env"]
    with pytest.raises(ConfigError):
        build_spec(_config(Cmd=["/bin/sh"]), root, tmp_path / "etc2", ProcessOptions(workdir="relative"))


def test_image_files_are_resolved_inside_the_image(tmp_path):
    """/etc/passwd as an absolute symlink must be read from the image, never from the host."""
    from lazyoci.runtime.bundle import resolve_in_root, resolve_user

    root = tmp_path / "rootfs"
    (root / "usr/lib").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr/lib/passwd").write_text("app:x:4242:4343::/home/app:/bin/sh\n")
    (root / "etc/passwd").symlink_to("/usr/lib/passwd")
    (root / "etc/grp").write_text("extra:x:77:app\n")
    (root / "etc/group").symlink_to("../../../../../../etc/grp")   # climbs above root: stays inside
    assert resolve_in_root(root, "etc/passwd") == root / "usr/lib/passwd"
    assert resolve_in_root(root, "etc/group") == root / "etc/grp"
    (root / "loop").symlink_to("loop")
    assert resolve_in_root(root, "loop") is None
    user = resolve_user(root, "app")
    assert (user.uid, user.gid, user.home, user.additional_gids) == (4242, 4343, "/home/app", (77,))


def test_ids_are_ascii_digits_only(tmp_path):
    """int() and str.isdigit accept other scripts' digits: "٣" must never run as uid 3."""
    from lazyoci.runtime.bundle import parse_id, resolve_user

    assert parse_id("0") == 0 and parse_id("4294967294") == 4294967294
    for text in ("٣", "３", "²", "-1", "+1", " 1", "4294967295", "", "1a"):
        assert parse_id(text) is None, text
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nsys:x:3:3::/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nsys:x:3:\n")
    assert resolve_user(root, "3").uid == 3
    for spec, words in (("٣", "unable to find user ٣"), ("0:٣", "unable to find group ٣"),
                        ("３:0", "unable to find user ３")):
        with pytest.raises(ContainerError, match=words):
            resolve_user(root, spec)


def test_non_numeric_ids_in_the_image_files_are_clear_errors(tmp_path):
    """A passwd/group entry the container would use whose uid/gid is not a number; other entries are ignored."""
    from lazyoci.runtime.bundle import resolve_user

    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nbad:x:abc:1::/:/bin/sh\n"
                                     "badgid:x:5:x1::/:/bin/sh\nthree:x:7:٣::/:/bin/sh\napp:x:9:9::/:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nweird:x:zz:app\narabic:x:٣:app\nok:x:11:app\n")
    for spec, words in (("bad", "'bad' in the image: its uid 'abc' is not a number"),
                        ("badgid", "'badgid' in the image: its gid 'x1' is not a number"),
                        ("three", "'three' in the image: its gid '٣' is not a number"),
                        ("app:weird", "'weird' in the image: its gid 'zz' is not a number")):
        with pytest.raises(ContainerError, match=words):
            resolve_user(root, spec)
    user = resolve_user(root, "app")          # supplementary groups with a bad gid are left out
    assert (user.uid, user.gid, user.additional_gids) == (9, 9, (11,))


@pytest.mark.parametrize("key", ["Cmd", "Entrypoint", "Env"])
def test_a_string_where_the_image_config_wants_a_list_is_an_error(key):
    """Iterating a string would run each character as an argument; docker's schema wants a list."""
    from lazyoci.errors import FormatError

    with pytest.raises(FormatError, match=f"image config {key} is not a list of strings"):
        _config(**{key: "echo hello"})
    with pytest.raises(FormatError, match=f"image config {key} is not a list of strings"):
        _config(**{key: ["ok", 3]})
    with pytest.raises(FormatError, match="image config User is not a string"):
        _config(User=0)


def test_an_env_file_that_is_not_utf8_is_a_config_error(tmp_path):
    from lazyoci.runtime.bundle import parse_env_file

    good = tmp_path / "good.env"
    good.write_text("# comment\nA=1\n\nB\n")
    assert parse_env_file(good) == ("A=1", "B")
    bad = tmp_path / "bad.env"
    bad.write_bytes(b"A=caf\xe9\n")
    with pytest.raises(ConfigError, match="bad.env is not UTF-8 text"):
        parse_env_file(bad)
    with pytest.raises(ConfigError, match="cannot read env file"):
        parse_env_file(tmp_path)
