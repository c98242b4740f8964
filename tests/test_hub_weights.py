"""The encoders' weights fetched by the Hugging Face Hub's own client (pipeline/hub_weights.py).

A local HTTP server (127.0.0.1 only) serves a Hub-shaped repository of small checkpoints made
here: ``HEAD``/``GET /<repo>/resolve/<revision>/<file>`` with the Hub's headers (the commit in
``X-Repo-Commit``, an LFS file's sha256 as its ``ETag``, ranges for resumed downloads). The
client reads ``HF_ENDPOINT`` when it is imported, so each case runs in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.hub
pytest.importorskip("huggingface_hub", reason="huggingface_hub is a dependency: pip install -e . -c constraints.txt")

REPO = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CT = ("project-lighter/ct_fm_feature_extractor", "model.safetensors")
PET = ("YichiZhang98/SegAnyPET", "seganypet_v1.pth")


class HubServer(ThreadingHTTPServer):
    """Files by (repo, name): bytes, a mode ("good", "corrupt": other bytes of the same size
    under the true sha256, "interrupt": the first GET stops halfway), and a request log."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[tuple[str, str], dict] = {}
        self.log: list[dict] = []

    def put(self, repo_file: tuple[str, str], data: bytes, mode: str = "good") -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.files[repo_file] = {"data": data, "sha": sha, "mode": mode, "gets": 0}
        return sha

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _file(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) != 5 or parts[2] != "resolve" or parts[3] not in ("main", COMMIT):
            return None
        return self.server.files.get(("/".join(parts[:2]), parts[4]))

    def _headers(self, f, status, length, extra=()):
        self.send_response(status)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{f["sha"]}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()

    def do_HEAD(self):
        self.server.log.append({"method": "HEAD", "path": self.path})
        f = self._file()
        if f is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._headers(f, 200, len(f["data"]))

    def do_GET(self):
        rng = self.headers.get("Range")
        self.server.log.append({"method": "GET", "path": self.path, "range": rng})
        f = self._file()
        if f is None:
            self.send_error(404)
            return
        data = f["data"]
        if f["mode"] == "corrupt":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        f["gets"] += 1
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if start:
            self._headers(f, 206, len(data) - start, [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")])
        else:
            self._headers(f, 200, len(data))
        body = data[start:]
        if f["mode"] == "interrupt" and f["gets"] == 1:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)  # a clean end of stream, halfway
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def hub():
    server = HubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def tiny_ct_checkpoint(seed: int = 7) -> bytes:
    """A real CT-FM safetensors file of a tiny SegResEncoder (the test encoders' widths)."""
    from safetensors.torch import save

    from models.checkpoints import random_ct_fm

    model = random_ct_fm(seed, init_filters=4)
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def env_for(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HNFM_CT_FM", "HNFM_PET_FM"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DOWNLOAD_TIMEOUT="10",
        HOME=str(tmp_path / "home"),
        PYTHONPATH=str(REPO / "tests"),
    )
    env.update(extra)
    return env


RESOLVE = """
import json, sys
from pipeline import extraction as ext
try:
    path = ext.resolve_weights(sys.argv[1], None)
except ext.WeightsNotFoundError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(3)
from pipeline.artefacts import sha256_file
print(json.dumps({"path": str(path), "sha256": sha256_file(path)}))
"""

# extract-embeddings' code path, weights from nowhere but the Hub, on a tiny cache.
EXTRACT = """
import json, sys, warnings
from pathlib import Path
from helpers import TINY_ENCODERS, make_cache
from pipeline import embeddings as emb
from pipeline import extraction as ext
cache = make_cache(Path(sys.argv[1]) / "cache")
out = Path(sys.argv[1]) / "ct.h5"
with warnings.catch_warnings():
    warnings.simplefilter("error", emb.RandomInitWarning)  # never random-init
    ext.run_extraction(cache.root, "ct", out, device="cpu", encoder_kwargs={"ct": TINY_ENCODERS["ct"]}, progress=False)
    a = emb.read_embeddings(out, cache=cache).dataset_attrs["ct"]
print(json.dumps({"weights_sha256": a["weights_sha256"], "weights_path": a["weights_path"]}))
"""


def run(script: str, env: dict[str, str], *args: str) -> tuple[int, dict, str]:
    p = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return p.returncode, (json.loads(lines[-1]) if lines else {}), p.stderr


def cached_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_weights_are_downloaded_checked_recorded_and_then_found_in_the_cache(hub, tmp_path):
    sha = hub.put(CT, tiny_ct_checkpoint())
    code, out, err = run(EXTRACT, env_for(tmp_path, hub.url), str(tmp_path))
    assert code == 0, err
    # The provenance records the sha256 of the file the Hub served, and the commit it resolved.
    assert out["weights_sha256"] == sha
    assert f"/snapshots/{COMMIT}/model.safetensors" in out["weights_path"]
    assert f"downloading {CT[0]}/{CT[1]} at revision {COMMIT}" in err
    gets = [r for r in hub.log if r["method"] == "GET"]
    assert len(gets) == 1
    # Offline, the Hub's cache answers: no request at all.
    n = len(hub.log)
    code, out, err = run(RESOLVE, env_for(tmp_path, hub.url, HF_HUB_OFFLINE="1"), "ct")
    assert code == 0, err
    assert out["sha256"] == sha and len(hub.log) == n


def test_a_corrupted_download_is_removed_from_the_cache_and_refused(hub, tmp_path):
    data = tiny_ct_checkpoint()
    sha = hub.put(PET, data, mode="corrupt")
    code, out, _ = run(RESOLVE, env_for(tmp_path, hub.url), "pet")
    assert code == 3
    msg = out["error"]
    assert f"the Hub's record of it is {sha}" in msg and "removed from the cache" in msg
    assert PET[0] in msg and PET[1] in msg and "--random-init" in msg
    assert not [p for p in cached_files(tmp_path) if p.stat().st_size == len(data)], "the bad file stayed in the cache"
    # Served right, the next run downloads it again and takes it.
    hub.put(PET, data)
    code, out, err = run(RESOLVE, env_for(tmp_path, hub.url), "pet")
    assert code == 0, err
    assert out["sha256"] == sha


def test_an_interrupted_download_resumes_and_is_checked(hub, tmp_path):
    sha = hub.put(CT, tiny_ct_checkpoint(seed=3), mode="interrupt")
    code, out, err = run(RESOLVE, env_for(tmp_path, hub.url), "ct")
    assert code == 0, err
    assert out["sha256"] == sha
    gets = [r for r in hub.log if r["method"] == "GET"]
    # The client tried again after the cut (from the byte it kept: its chunks are 10 MB, so here
    # from the start) and the file it kept is whole: its sha256 is the Hub's.
    assert len(gets) == 2 and gets[0]["range"] is None, gets
    assert not [p for p in cached_files(tmp_path) if p.name.endswith(".incomplete")]


def test_offline_or_unreachable_names_the_repository_file_revision_and_where_to_put_it(hub, tmp_path):
    code, out, _ = run(RESOLVE, env_for(tmp_path, hub.url, HF_HUB_OFFLINE="1"), "ct")
    assert code == 3
    for needle in (
        CT[0],
        CT[1],
        "revision main",
        "HF_HUB_OFFLINE",
        "~/.cache/hnfm/ct_fm/model.safetensors",
        "HNFM_CT_FM_WEIGHTS",
        "--ct-weights",
        "--random-init",
        f"hf download {CT[0]} {CT[1]}",
    ):
        assert needle in out["error"], needle
    # A pinned revision is the one named; a server that does not answer is named too.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    code, out, _ = run(RESOLVE, env_for(tmp_path, f"http://127.0.0.1:{port}", HNFM_PET_FM_REVISION=COMMIT), "pet")
    assert code == 3
    assert f"revision {COMMIT}" in out["error"] and f"http://127.0.0.1:{port}" in out["error"]
    assert f"--revision {COMMIT}" in out["error"] and not hub.log
