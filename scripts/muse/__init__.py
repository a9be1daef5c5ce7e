"""muse — the client library of musehubd's command-line tools.

A second, independent Python implementation of the Muse formats (SPEC 1,
2, 2.1: ids, the mpack v0/v1/v2, the delta rebuild), plus a streaming
HTTP client of the server's API.  Standard library and Debian's
python3-msgpack, python3-zstandard, python3-cryptography only; run with
/usr/bin/python3.

Modules
  ids       blob_id, snapshot_id, commit_id, valid_id, valid_path, Manifest
  mpwalk    a streaming msgpack walker over a file (bounded memory)
  mpack     PackWriter (v0/v1/v2), read_pack -> PackIndex, build/parse_mpack
  history   verify_history, rebuild_and_verify, generate -> History, ...
  hub       Hub (http.client; streamed uploads/downloads), HubError
  state     LocalState (what muse-fetch keeps between fetches)
  push      incremental push (outgoing, Pusher)
  fetch     fetch + streaming verify + checkout
  gitconv   git -> Muse conversion with a persistent state (git2muse)
  msign     MSign request signing (SPEC 5)
  ui        options, progress and errors shared by the tools
"""
# Submodules load on first use (PEP 562), so a tool that needs only the
# HTTP client and the pack reader does not pay for the rest at start-up.
_LAZY = {
    "EMPTY_SNAPSHOT_ID": "ids",
    "ID_PREFIX": "ids",
    "MAX_PATH_BYTES": "ids",
    "Manifest": "ids",
    "blob_id": "ids",
    "commit_id": "ids",
    "commit_id_of": "ids",
    "commit_parents": "ids",
    "commit_payload": "ids",
    "snapshot_id": "ids",
    "snapshot_payload": "ids",
    "valid_id": "ids",
    "valid_path": "ids",
    "PackError": "mpwalk",
    "Walker": "mpwalk",
    "FRAME_MAX": "mpack",
    "MPACK_MAGIC": "mpack",
    "PackIndex": "mpack",
    "PackWriter": "mpack",
    "build_mpack": "mpack",
    "parse_mpack": "mpack",
    "read_pack": "mpack",
    "SEED_EPOCH": "history",
    "History": "history",
    "generate": "history",
    "manifest_delta": "history",
    "pack_tips": "history",
    "rebuild_and_verify": "history",
    "snapshot_map": "history",
    "topo_commits": "history",
    "verify_history": "history",
    "JSON": "hub",
    "MSGPACK": "hub",
    "Hub": "hub",
    "HubError": "hub",
    "Response": "hub",
    "TransportError": "hub",
    "encode_body": "hub",
    "LocalState": "state",
}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'muse' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "EMPTY_SNAPSHOT_ID", "ID_PREFIX", "MAX_PATH_BYTES", "Manifest", "blob_id",
    "commit_id", "commit_id_of", "commit_parents", "commit_payload", "snapshot_id",
    "snapshot_payload", "valid_id", "valid_path", "PackError", "Walker", "FRAME_MAX",
    "MPACK_MAGIC", "PackIndex", "PackWriter", "build_mpack", "parse_mpack",
    "read_pack", "SEED_EPOCH", "History", "generate", "manifest_delta", "pack_tips",
    "rebuild_and_verify", "snapshot_map", "topo_commits", "verify_history", "JSON",
    "MSGPACK", "Hub", "HubError", "Response", "TransportError", "encode_body",
    "LocalState",
]
