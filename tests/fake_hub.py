"""A loopback HTTP server that stands in for the Hugging Face Hub's upload API, for tests.

It answers the requests huggingface_hub's HfApi.create_repo + upload_folder make on the LFS
path (HF_HUB_DISABLE_XET set): POST /api/repos/create, POST /api/validate-yaml (README.md
metadata), POST /api/models/{repo}/preupload/{rev},
POST /{repo}.git/info/lfs/objects/batch, PUT of each LFS object to the URL the batch answer
gives, POST /api/models/{repo}/commit/{rev} (NDJSON). Anything else is answered 404 and
recorded in ``unknown``. ``refuse`` makes repository creation answer 403, as the Hub does for a
token without write access.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, token: str, refuse: bool = False):
        self.token = token
        self.refuse = refuse
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}}
        self.lfs: dict[str, bytes] = {}  # sha256 hex -> content
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.authorizations: set[str] = set()
        self.card_metadata: list[dict] = []  # README.md front matter sent to /api/validate-yaml
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload=None, message: str | None = None):
                body = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if message:
                    self.send_header("X-Error-Message", message)
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self) -> bool:
                auth = self.headers.get("Authorization", "")
                hub.authorizations.add(auth)
                if auth != f"Bearer {hub.token}":
                    self._send(401, {"error": "Invalid credentials"}, "Invalid credentials in Authorization header")
                    return False
                return True

            def do_POST(self):
                body = self._body()
                path = self.path.split("?")[0]
                hub.requests.append(("POST", path))
                if path == "/api/repos/create":
                    if not self._authorised():
                        return
                    if hub.refuse:
                        return self._send(403, {"error": "forbidden"},
                                          "You don't have the rights to create a model under this namespace")
                    request = json.loads(body)
                    repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") \
                        else f"user/{request['name']}"
                    hub.repos.setdefault(repo_id, {"visibility": request.get("visibility"),
                                                   "private": request.get("private"), "files": {}})
                    return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": "0" * 24})
                if path == "/api/validate-yaml":  # the client checks README.md's metadata before a commit
                    if not self._authorised():
                        return
                    import yaml

                    content = json.loads(body)["content"]
                    try:
                        front = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                    except yaml.YAMLError:
                        return self._send(400, {"errors": [{"message": "invalid YAML"}]}, "invalid YAML")
                    hub.card_metadata.append(front)
                    return self._send(200, {"errors": [], "warnings": []})
                if "/preupload/" in path:
                    if not self._authorised():
                        return
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors")
                         or f["size"] > 10_000 else "regular", "shouldIgnore": False, "oid": None}
                        for f in files]})
                if path.endswith(".git/info/lfs/objects/batch"):
                    if not self._authorised():
                        return
                    objects = json.loads(body)["objects"]
                    return self._send(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"], "authenticated": True,
                         "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}", "header": {}}}}
                        for o in objects]})
                if "/commit/" in path and path.startswith("/api/models/"):
                    if not self._authorised():
                        return
                    repo_id = path[len("/api/models/"):].split("/commit/")[0]
                    if repo_id not in hub.repos:
                        return self._send(404, {"error": "Repository not found"}, "Repository not found")
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            hub.repos[repo_id]["files"][value["path"]] = base64.b64decode(value["content"])
                        elif item["key"] == "lfsFile":
                            value = item["value"]
                            if value["oid"] not in hub.lfs:
                                return self._send(422, {"error": "LFS object missing"}, f"missing {value['oid']}")
                            hub.repos[repo_id]["files"][value["path"]] = hub.lfs[value["oid"]]
                    return self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{'a' * 40}",
                                            "commitOid": "a" * 40, "pullRequestUrl": None})
                hub.unknown.append(("POST", path))
                return self._send(404, {"error": "not found"}, f"no such endpoint {path}")

            def do_PUT(self):
                body = self._body()
                path = self.path.split("?")[0]
                hub.requests.append(("PUT", path))
                if path.startswith("/lfs-upload/"):
                    oid = path.rsplit("/", 1)[1]
                    if hashlib.sha256(body).hexdigest() != oid:
                        return self._send(400, {"error": "sha256 mismatch"}, "sha256 mismatch")
                    hub.lfs[oid] = body
                    return self._send(200, {})
                hub.unknown.append(("PUT", path))
                return self._send(404, {"error": "not found"})

            def do_GET(self):
                path = self.path.split("?")[0]
                hub.requests.append(("GET", path))
                hub.unknown.append(("GET", path))
                return self._send(404, {"error": "not found"}, f"no such endpoint {path}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
