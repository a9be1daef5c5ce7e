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
from .ids import (EMPTY_SNAPSHOT_ID, ID_PREFIX, MAX_PATH_BYTES, Manifest, blob_id,
                  commit_id, commit_id_of, commit_parents, commit_payload, snapshot_id,
                  snapshot_payload, valid_id, valid_path)
from .mpwalk import PackError, Walker
from .mpack import (FRAME_MAX, MPACK_MAGIC, PackIndex, PackWriter, build_mpack,
                    parse_mpack, read_pack)
from .history import (SEED_EPOCH, History, generate, manifest_delta, pack_tips,
                      rebuild_and_verify, snapshot_map, topo_commits, verify_history)
from .hub import JSON, MSGPACK, Hub, HubError, Response, TransportError, encode_body
from .state import LocalState

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
