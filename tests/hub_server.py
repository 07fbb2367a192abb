"""A Hugging Face Hub look-alike on 127.0.0.1 that speaks the protocol huggingface_hub 2.4 downloads with.

    HEAD/GET /{repo_id}/resolve/{revision}/{path}   file bytes, `X-Repo-Commit`, `ETag`, `Content-Length`, Range (206)
    GET /api/models/{repo_id}/revision/{revision}   repo info with the commit `sha` (snapshot_download resolves with it)
    GET /api/models/{repo_id}/tree/{revision}       recursive file listing (snapshot_download filters it)

Errors carry the Hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which
is how huggingface_hub tells a missing repo from a missing file. Tests point `HF_ENDPOINT` at `hub.url`, serve
repos with `hub.add_repo(...)` and read `hub.requests` to see what the client asked for (and `sent`: how many
body bytes it got); `hub.cut_next_download(...)` drops or stalls a download, `hub.honour_range = False` answers a
Range request with the whole file.
"""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<revision>[^/]+)$")
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt")


def commit_of(repo_id: str, revision: str) -> str:
    """A stable 40-hex commit hash per (repo, revision), as the Hub's `X-Repo-Commit`."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    """Answers one request from the `FakeHub` it belongs to (`self.server`) and logs it there."""

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def log_message(self, *args):
        pass  # keep pytest output clean; `requests` is the log

    def answer(self, send_body: bool):
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.logged = {"method": self.command, "path": path, "range": self.headers.get("Range"), "sent": 0}
        self.server.requests.append(self.logged)
        if match := RESOLVE.match(path):
            repo = self.find_repo(match["repo"], match["revision"])
            if repo is not None:
                self.send_file(repo, match["revision"], match["path"], send_body)
        elif match := API.match(path):
            repo = self.find_repo(match["repo"], match["revision"])
            if repo is not None:
                commit = commit_of(match["repo"], self.canonical_revision(repo, match["revision"]))
                if match["kind"] == "revision":
                    info = {"id": match["repo"], "sha": commit, "siblings": [{"rfilename": p} for p in repo["files"]]}
                    self.send_json(info)
                else:
                    self.send_json(tree_listing(repo["files"]))
        else:
            self.send_error_code(404, "RepoNotFound", "Not a Hub route")

    def find_repo(self, repo_id: str, revision: str):
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self.send_error_code(404, "RepoNotFound", f"Repository {repo_id} not found")
        elif repo["gated"] and self.headers.get("Authorization") is None:
            self.send_error_code(401, "GatedRepo", f"Access to model {repo_id} is restricted. Please log in.")
        elif self.canonical_revision(repo, revision) is None:
            self.send_error_code(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        else:
            return repo
        return None

    @staticmethod
    def canonical_revision(repo, revision: str):
        """The branch/tag name that `revision` (a name or its commit hash) refers to, or None."""
        for name in repo["revisions"]:
            if revision in (name, commit_of(repo["id"], name)):
                return name
        return None

    def send_file(self, repo, revision: str, filename: str, send_body: bool):
        commit = commit_of(repo["id"], self.canonical_revision(repo, revision))
        content = repo["files"].get(filename)
        if content is None:
            self.send_error_code(404, "EntryNotFound", f"{filename} does not exist", commit=commit)
            return
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if ranged and self.server.honour_range:
            start = int(ranged[1])
        body = content[start:]
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        self.end_headers()
        if not send_body:
            return
        cut, stall = self.server.cut_after.pop(filename, (None, False))
        # A dropped connection half-way through the body, as on a flaky network: the client must resume.
        self.wfile.write(body[:cut])
        self.logged["sent"] = len(body[:cut])
        if stall:  # a network that stops answering: the client waits until it gives up or is stopped
            self.server.closing.wait()
        if cut is not None:
            self.close_connection = True

    def send_json(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def send_error_code(self, status: int, code: str, message: str, commit: str | None = None):
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)


def tree_listing(files: dict[str, bytes]) -> list[dict]:
    """The `/tree?recursive=true` answer: folders, then files with git blob ids and LFS info for weights."""
    folders = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
    entries = [
        {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f} for f in folders
    ]
    for path, content in sorted(files.items()):
        entry = {
            "type": "file",
            "oid": hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest(),
            "size": len(content),
            "path": path,
        }
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
        entries.append(entry)
    return entries


class FakeHub(ThreadingHTTPServer):
    """A running Hub look-alike: `url` for HF_ENDPOINT, `add_repo` to serve files, `requests` to inspect."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos, self.requests, self.cut_after, self.closing = {}, [], {}, threading.Event()
        self.honour_range = True  # False: answer a Range request with the whole file (200), as some proxies do
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def add_repo(self, repo_id: str, files: dict[str, bytes], revisions=("main",), gated: bool = False):
        self.repos[repo_id] = {"id": repo_id, "files": dict(files), "revisions": tuple(revisions), "gated": gated}

    def cut_next_download(self, filename: str, after_bytes: int, stall: bool = False):
        """Drop the connection after `after_bytes` bytes of the next GET of `filename`; with `stall`, send nothing
        more but hold the connection open until the hub closes."""
        self.cut_after[filename] = (after_bytes, stall)

    def file_gets(self, filename: str) -> list[dict]:
        """The GET requests for the bytes of `filename` (any repo, any revision)."""
        return [
            r
            for r in self.requests
            if r["method"] == "GET" and (match := RESOLVE.match(r["path"])) and match["path"] == filename
        ]

    def close(self):
        self.closing.set()
        self.shutdown()
        self.server_close()
