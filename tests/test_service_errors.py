"""Errors keep their class and fields across the service's control socket."""

from __future__ import annotations

import hashlib
import inspect
import json

import pytest

from helpers.lazy import write_config
from lazyoci import errors
from lazyoci.errors import IntegrityError, LazyociError, RegistryError, ServiceError, StoreError
from lazyoci.service.client import ServiceClient
from lazyoci.service.error_wire import error_from_reply, error_reply
from lazyoci.store.layout import DataRoot


def _error_classes() -> list[type[LazyociError]]:
    return [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, LazyociError)]


def _keywords(cls: type[LazyociError]) -> set[str]:
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]    # past self, message
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_fields_are_the_constructor_keywords(cls):
    """The contract error_wire relies on: an error is rebuilt from its message and fields."""
    sample = {name: f"value of {name}" for name in _keywords(cls)}
    error = cls("what went wrong", **sample)
    assert set(error.fields()) == set(sample)
    again = error_from_reply(json.loads(json.dumps(error_reply(error))))
    assert type(again) is cls
    assert str(again) == "what went wrong"
    assert again.fields() == error.fields()


def test_a_reply_keeps_status_and_code():
    error = RegistryError("denied", status=403, code="DENIED")
    again = error_from_reply(json.loads(json.dumps(error_reply(error))))
    assert type(again) is RegistryError and (again.status, again.code) == (403, "DENIED")


def test_unknown_or_malformed_errors_become_service_errors():
    assert type(error_from_reply({"ok": False, "error": "x", "type": "KeyError"})) is ServiceError
    assert type(error_from_reply({"ok": False, "error": "x", "type": "NoSuchError"})) is ServiceError
    bad = error_from_reply({"ok": False, "error": "x", "type": "IntegrityError", "fields": {"expected": [1]}})
    assert type(bad) is ServiceError and "malformed" in str(bad)
    older = error_from_reply({"ok": False, "error": "x", "type": "StoreError"})     # no fields at all
    assert type(older) is StoreError
    other = error_from_reply({"ok": False, "error": "x", "type": "StoreError", "fields": {"unknown": 1}})
    assert type(other) is StoreError and str(other) == "x"


@pytest.mark.needs_root("the service mounts FUSE")
def test_errors_from_the_running_service_keep_class_and_fields(data_root, tmp_path):
    root = DataRoot(data_root)
    client = ServiceClient(root, write_config(tmp_path / "c.yaml"))
    layer = "sha256:" + "1" * 64
    missing = "sha256:" + "2" * 64
    data = b"not the zTOC this name promises"
    claimed = "sha256:" + "3" * 64
    try:
        client.start()
        with pytest.raises(StoreError) as missing_blob:
            client.request("mount_layer", ref="localhost:1/none:latest", layer_digest=layer, ztoc_digest=missing)
        assert type(missing_blob.value) is StoreError and missing in str(missing_blob.value)

        blob = root.blobs / "sha256" / claimed.removeprefix("sha256:")
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        with pytest.raises(IntegrityError) as mismatch:
            client.request("mount_layer", ref="localhost:1/none:latest", layer_digest=layer, ztoc_digest=claimed)
        assert mismatch.value.expected == claimed
        assert mismatch.value.actual == "sha256:" + hashlib.sha256(data).hexdigest()
    finally:
        client.stop(force=True)
