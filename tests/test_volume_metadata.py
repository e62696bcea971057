"""Cinder's volume metadata API (``/volumes/{id}/metadata[/{key}]``) against a real server:
each call's answer, Cinder's errors, the policy rules (a reader reads, a member writes,
another project's volume is 404 first), and the real ``openstack volume set/unset
--property`` that the nbd backend's ``bitmap`` key is set with."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.server import Api, Server
from tests.test_policy import forbidden, key_client


def fault(r, code: int, key: str) -> str:
    assert r.status_code == code, r.text
    body = r.json()
    assert list(body) == [key] and body[key]["code"] == code, body
    return body[key]["message"]


def _project() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def vol(alice: Api) -> str:
    return alice.create_volume(1, metadata={"a": "1", "b": "2"})


# -- each call -------------------------------------------------------------------------------


def test_crud_as_cinder(alice, vol):
    r = alice.get(f"/volumes/{vol}/metadata")
    assert (r.status_code, r.json()) == (200, {"metadata": {"a": "1", "b": "2"}})

    # POST merges and answers with the whole metadata
    r = alice.post(f"/volumes/{vol}/metadata", {"metadata": {"b": "20", "c": "3"}})
    assert (r.status_code, r.json()) == (200, {"metadata": {"a": "1", "b": "20", "c": "3"}})

    # PUT on the collection replaces it all
    r = alice.put(f"/volumes/{vol}/metadata", {"metadata": {"bitmap": "b1", "x": "y"}})
    assert (r.status_code, r.json()) == (200, {"metadata": {"bitmap": "b1", "x": "y"}})
    assert alice.get(f"/volumes/{vol}").json()["volume"]["metadata"] == {"bitmap": "b1",
                                                                         "x": "y"}

    # one item
    r = alice.get(f"/volumes/{vol}/metadata/bitmap")
    assert (r.status_code, r.json()) == (200, {"meta": {"bitmap": "b1"}})
    r = alice.put(f"/volumes/{vol}/metadata/bitmap", {"meta": {"bitmap": "b2"}})
    assert (r.status_code, r.json()) == (200, {"meta": {"bitmap": "b2"}})
    r = alice.put(f"/volumes/{vol}/metadata/new", {"meta": {"new": "v"}})  # creates it
    assert (r.status_code, r.json()) == (200, {"meta": {"new": "v"}})
    assert alice.get(f"/volumes/{vol}/metadata").json() == {
        "metadata": {"bitmap": "b2", "x": "y", "new": "v"}}

    # DELETE: 200 and an empty body, as Cinder's webob.Response(status_int=200)
    r = alice.delete(f"/volumes/{vol}/metadata/x")
    assert (r.status_code, r.content) == (200, b"")
    assert alice.get(f"/volumes/{vol}/metadata").json() == {
        "metadata": {"bitmap": "b2", "new": "v"}}

    # PUT {} empties it
    r = alice.put(f"/volumes/{vol}/metadata", {"metadata": {}})
    assert (r.status_code, r.json()) == (200, {"metadata": {}})


def test_v2_is_served_too(server, alice, vol):
    v2 = server.client("alice", alice.project, api="v2")
    r = v2.post(f"/volumes/{vol}/metadata", {"metadata": {"k": "v"}})
    assert (r.status_code, r.json()) == (200, {"metadata": {"a": "1", "b": "2", "k": "v"}})
    assert v2.get(f"/volumes/{vol}/metadata/k").json() == {"meta": {"k": "v"}}
    assert v2.delete(f"/volumes/{vol}/metadata/k").status_code == 200


# -- errors, in Cinder's words ---------------------------------------------------------------


def test_missing_key_and_missing_volume(alice, vol):
    msg = fault(alice.get(f"/volumes/{vol}/metadata/nope"), 404, "itemNotFound")
    assert msg == f"Volume {vol} has no metadata with key nope."
    msg = fault(alice.delete(f"/volumes/{vol}/metadata/nope"), 404, "itemNotFound")
    assert msg == f"Volume {vol} has no metadata with key nope."
    ghost = str(uuid.uuid4())
    for r in (alice.get(f"/volumes/{ghost}/metadata"),
              alice.post(f"/volumes/{ghost}/metadata", {"metadata": {"k": "v"}}),
              alice.put(f"/volumes/{ghost}/metadata", {"metadata": {"k": "v"}}),
              alice.get(f"/volumes/{ghost}/metadata/k"),
              alice.put(f"/volumes/{ghost}/metadata/k", {"meta": {"k": "v"}}),
              alice.delete(f"/volumes/{ghost}/metadata/k")):
        assert fault(r, 404, "itemNotFound") == f"Volume {ghost} could not be found."
    # a deleted volume is gone
    assert alice.delete(f"/volumes/{vol}").status_code == 202
    assert fault(alice.get(f"/volumes/{vol}/metadata"), 404, "itemNotFound") == \
        f"Volume {vol} could not be found."


def test_item_body_must_match_the_url(alice, vol):
    r = alice.put(f"/volumes/{vol}/metadata/a", {"meta": {"b": "v"}})
    assert fault(r, 400, "badRequest") == "Request body and URI mismatch"
    # Two items: Cinder's schema (maxProperties 1) refuses the body before its own
    # "Request body contains too many items" check is reached.
    r = alice.put(f"/volumes/{vol}/metadata/a", {"meta": {"a": "1", "b": "2"}})
    msg = fault(r, 400, "badRequest")
    assert msg.startswith("Invalid input for field/attribute meta.") and \
        "too many properties" in msg, msg
    r = alice.put(f"/volumes/{vol}/metadata/a", {"meta": {}})
    msg = fault(r, 400, "badRequest")
    assert msg.startswith("Invalid input for field/attribute meta."), msg
    assert alice.get(f"/volumes/{vol}/metadata").json() == {"metadata": {"a": "1", "b": "2"}}


@pytest.mark.parametrize("body", [
    {},
    {"meta": {"k": "v"}},
    {"metadata": {"k": "v"}, "other": 1},
    {"metadata": None},
    {"metadata": ["k"]},
    {"metadata": {"k": 1}},
    {"metadata": {"k": "v" * 256}},
    {"metadata": {"k" * 256: "v"}},
    {"metadata": {"": "v"}},
    {"metadata": {"bad\nkey": "v"}},
    {"metadata": {"bäd": "v"}},
])
def test_collection_bodies_follow_cinders_schema(alice, vol, body):
    for r in (alice.post(f"/volumes/{vol}/metadata", body),
              alice.put(f"/volumes/{vol}/metadata", body)):
        fault(r, 400, "badRequest")
    assert alice.get(f"/volumes/{vol}/metadata").json() == {"metadata": {"a": "1", "b": "2"}}


def test_limits_are_255_and_keys_are_cinders_characters(alice, vol):
    key = "k" * 255
    ok = {key: "v" * 255, "a-b_c:d. e/f": "x"}
    r = alice.post(f"/volumes/{vol}/metadata", {"metadata": ok})
    assert r.status_code == 200 and r.json()["metadata"][key] == "v" * 255
    r = alice.put(f"/volumes/{vol}/metadata/{key}", {"meta": {key: "w" * 256}})
    assert "is too long" in fault(r, 400, "badRequest")


@pytest.mark.parametrize("status", ["maintenance", "uploading"])
def test_changes_refused_in_maintenance_and_uploading(alice, admin, vol, status):
    r = admin.post(f"/volumes/{vol}/action", {"os-reset_status": {"status": status}})
    assert r.status_code == 202, r.text
    updating = (f"Invalid volume: Updating volume metadata is not allowed for volumes in "
                f"{status} status.")
    for r in (alice.post(f"/volumes/{vol}/metadata", {"metadata": {"k": "v"}}),
              alice.put(f"/volumes/{vol}/metadata", {"metadata": {"k": "v"}}),
              alice.put(f"/volumes/{vol}/metadata/a", {"meta": {"a": "9"}})):
        assert fault(r, 400, "badRequest") == updating
    assert fault(alice.delete(f"/volumes/{vol}/metadata/a"), 400, "badRequest") == (
        f"Invalid volume: Deleting volume metadata is not allowed for volumes in {status} "
        "status.")
    # reading is fine, and nothing changed
    assert alice.get(f"/volumes/{vol}/metadata").json() == {"metadata": {"a": "1", "b": "2"}}
    # other statuses (in-use, error) allow changes, as in Cinder
    admin.post(f"/volumes/{vol}/action", {"os-reset_status": {"status": "error"}})
    assert alice.post(f"/volumes/{vol}/metadata", {"metadata": {"k": "v"}}).status_code == 200


def test_another_projects_volume_is_404(server, alice, vol):
    bob = server.client("bob", _project())
    for r in (bob.get(f"/volumes/{vol}/metadata"),
              bob.post(f"/volumes/{vol}/metadata", {"metadata": {"k": "v"}}),
              bob.put(f"/volumes/{vol}/metadata", {"metadata": {}}),
              bob.get(f"/volumes/{vol}/metadata/a"),
              bob.put(f"/volumes/{vol}/metadata/a", {"meta": {"a": "x"}}),
              bob.delete(f"/volumes/{vol}/metadata/a")):
        assert fault(r, 404, "itemNotFound") == f"Volume {vol} could not be found."
    assert alice.get(f"/volumes/{vol}/metadata").json() == {"metadata": {"a": "1", "b": "2"}}


# -- policy: a reader reads, a member writes ---------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("bv-meta-keys"),
                 {"BLOCKVAULT_AUTH_STRATEGY": "apikey"}).start()
    yield srv
    srv.stop()


def test_reader_reads_member_writes(keyed):
    project = _project()
    reader = key_client(keyed, project, "rita", "reader")
    member = key_client(keyed, project, "mona", "member")
    outsider = key_client(keyed, _project(), "otto", "member")
    vol = member.create_volume(1, metadata={"a": "1"})

    assert reader.get(f"/volumes/{vol}/metadata").json() == {"metadata": {"a": "1"}}
    assert reader.get(f"/volumes/{vol}/metadata/a").json() == {"meta": {"a": "1"}}
    r = reader.post(f"/volumes/{vol}/metadata", {"metadata": {"k": "v"}})
    assert (r.status_code, r.json()) == (403, forbidden("volume:create_volume_metadata"))
    r = reader.put(f"/volumes/{vol}/metadata", {"metadata": {"k": "v"}})
    assert (r.status_code, r.json()) == (403, forbidden("volume:update_volume_metadata"))
    r = reader.put(f"/volumes/{vol}/metadata/a", {"meta": {"a": "2"}})
    assert (r.status_code, r.json()) == (403, forbidden("volume:update_volume_metadata"))
    r = reader.delete(f"/volumes/{vol}/metadata/a")
    assert (r.status_code, r.json()) == (403, forbidden("volume:delete_volume_metadata"))
    # as Cinder, the key is looked up (a read) before the delete rule
    r = reader.delete(f"/volumes/{vol}/metadata/nope")
    assert r.status_code == 404, r.text
    assert member.get(f"/volumes/{vol}/metadata").json() == {"metadata": {"a": "1"}}

    assert member.post(f"/volumes/{vol}/metadata", {"metadata": {"k": "v"}}).status_code == 200
    assert member.put(f"/volumes/{vol}/metadata/k", {"meta": {"k": "w"}}).status_code == 200
    assert member.delete(f"/volumes/{vol}/metadata/a").status_code == 200
    assert member.put(f"/volumes/{vol}/metadata", {"metadata": {"z": "1"}}).status_code == 200

    # another project's member: 404 before any policy check
    for r in (outsider.get(f"/volumes/{vol}/metadata"),
              outsider.post(f"/volumes/{vol}/metadata", {"metadata": {"k": "v"}}),
              outsider.delete(f"/volumes/{vol}/metadata/z")):
        assert r.status_code == 404, r.text
    assert member.get(f"/volumes/{vol}/metadata").json() == {"metadata": {"z": "1"}}


# -- the openstack CLI -----------------------------------------------------------------------


def _osc(server: Server, token: str, *args: str, fmt: bool = True):
    cmd = [sys.executable, "-m", "openstackclient.shell", "--os-auth-type", "admin_token",
           "--os-token", token, "--os-endpoint", f"{server.url}/v3", *args]
    if fmt:
        cmd += ["-f", "json"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OS_", "Cinder_", "CINDER_"))}
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, f"{args}: {p.stderr}"
    return json.loads(p.stdout) if fmt and p.stdout.strip() else p.stdout


@pytest.mark.skipif(importlib.util.find_spec("openstackclient") is None,
                    reason="python-openstackclient is not installed")
def test_openstack_volume_set_and_unset_property(server):
    project = _project()
    token = f"alice:{project}"
    api = server.client("alice", project)
    vol = api.create_volume(1)
    _osc(server, token, "volume", "set", "--property", "bitmap=b1", "--property", "k=v", vol,
         fmt=False)
    assert api.get(f"/volumes/{vol}/metadata").json() == {"metadata": {"bitmap": "b1",
                                                                       "k": "v"}}
    shown = _osc(server, token, "volume", "show", vol)
    assert shown["properties"] == {"bitmap": "b1", "k": "v"}, shown
    _osc(server, token, "volume", "unset", "--property", "bitmap", vol, fmt=False)
    shown = _osc(server, token, "volume", "show", vol)
    assert shown["properties"] == {"k": "v"}, shown
    assert api.get(f"/volumes/{vol}/metadata").json() == {"metadata": {"k": "v"}}
