"""A minimal Hugging Face Hub on 127.0.0.1 that accepts repo creation and commits, and records them.

It answers the endpoints ``HfApi.create_repo`` and ``HfApi.upload_folder`` use (huggingface_hub 2.x):
``/api/repos/create``, ``/api/validate-yaml``, ``/api/models/{repo}/preupload/{rev}`` (every file
"regular", so contents travel base64-encoded inside the commit: no LFS, no Xet) and
``/api/models/{repo}/commit/{rev}`` (ndjson). Use the ``fake_hub`` fixture; nothing leaves loopback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    files: dict[str, bytes]
    deleted: list[str]
    oid: str


@dataclass
class FakeHub:
    """Recorded state: created repos, commits, and each repo's current files."""

    created: list[dict] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    url: str = ""

    def __post_init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") \
                        else payload["name"]
                    hub.created.append(payload)
                    hub.repos.setdefault(repo_id, {})  # an existing repo is fine: callers pass exist_ok
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
                if match is None:
                    return self._reply(404, {"error": f"fake hub: no route for POST {path}"})
                repo_id, action, revision = match.groups()
                if repo_id not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                        for f in files]})
                return self._reply(200, hub._commit(repo_id, revision, body))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _commit(self, repo_id: str, revision: str, body: bytes) -> dict:
        summary, files, deleted = "", {}, []
        for line in filter(None, body.split(b"\n")):
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"]["summary"]
            elif item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(item["value"]["path"])
            else:
                raise ValueError(f"fake hub: unexpected commit entry {item['key']!r}")
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append(Commit(repo_id, revision, summary, files, deleted, oid))
        tree = self.repos[repo_id]
        for path in deleted:
            tree.pop(path, None)
        tree.update(files)
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid}

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path):
    """A running FakeHub that huggingface_hub (and so transformers) talks to instead of the Hub."""
    from huggingface_hub import constants

    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "fake-token")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    try:
        yield hub
    finally:
        hub.stop()
