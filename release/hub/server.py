"""A Hugging Face Hub-compatible HTTP server over a local folder: the stand-in for huggingface.co.

Why write one: the Hub cannot be reached from CI or from a fresh machine without an account, and no
maintained package ships a Hub server (`hf-local-hub`'s server is a separate binary; `olah` only
mirrors an upstream hub). This implements, as the Hub documents and the unmodified
``huggingface_hub`` client uses them, the endpoints for: create repo, repo settings (gating,
visibility), preupload (upload mode and remote oid per file), the git-LFS batch API (basic
transfer, upload + verify, objects already stored get no actions), NDJSON commits (regular and
LFS files, deletions, parent-commit check), branches, tags, refs, repo info, file tree, paths-info,
and resolve/download (HEAD metadata headers, ranges). It speaks LFS, not Xet: clients run with
``HF_HUB_DISABLE_XET=1`` (huggingface.co accepts both).

Storage: ``ROOT/lfs/<sha256>`` and ``ROOT/blobs/<git-sha1>`` (content-addressed), and one
``ROOT/repos/<type>/<org>/<name>.json`` per repository holding its commits (each a full tree) and refs.

Used by the tests (started on 127.0.0.1:0), by ``model-release hub serve``, and in-process behind
``--endpoint local:DIR`` (the embedded target that needs no account).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# What a new Hub repository's .gitattributes stores in LFS (abridged), plus GGUF; larger files and
# binary samples go to LFS too, as on the Hub.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack",
                "*.model", "*.npy", "*.npz", "*.pkl", "*.png", "*.jpg", "*.zip", "*.tar", "*.gz", "*.sig")  # fmt: skip
LFS_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
_API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?$")
_LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(path: str, size: int, sample: bytes = b"") -> bool:
    name = path.rsplit("/", 1)[-1]
    return size >= LFS_SIZE or b"\0" in sample or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


@dataclass
class HubState:
    """Server-wide settings and counters (tests read the counters and set the hold)."""

    root: Path
    token: str | None = None  # None: no authentication (the embedded local target)
    lfs_uploads: int = 0  # LFS objects stored
    lfs_admitted: int = 0  # LFS uploads let through (the hold counts these)
    hold_uploads_after: int | None = None  # block further LFS uploads (simulate a publish cut off)
    released: threading.Event = field(default_factory=threading.Event)
    lock: threading.RLock = field(default_factory=threading.RLock)
    requests: list[str] = field(default_factory=list)


class Store:
    """Content-addressed objects and repository records on disk, written atomically."""

    def __init__(self, state: HubState) -> None:
        self.state = state
        self.root = state.root
        for d in ("lfs", "blobs", "repos", "tmp"):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    # objects
    def lfs_path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise HubError(400, f"invalid LFS oid {sha256!r}")
        return self.root / "lfs" / sha256

    def blob_path(self, sha1: str) -> Path:
        return self.root / "blobs" / sha1

    def put_blob(self, data: bytes) -> str:
        sha1 = git_blob_sha1(data)
        self._write(self.blob_path(sha1), data)
        return sha1

    def _write(self, path: Path, data: bytes) -> None:
        tmp = self.root / "tmp" / uuid.uuid4().hex
        tmp.write_bytes(data)
        os.replace(tmp, path)

    # repositories
    def repo_file(self, rtype: str, repo_id: str) -> Path:
        org, name = repo_id.split("/")
        if not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p) for p in (org, name)):
            raise HubError(400, f"invalid repo id {repo_id!r}")
        return self.root / "repos" / rtype / org / f"{name}.json"

    def load(self, rtype: str, repo_id: str) -> dict[str, Any]:
        path = self.repo_file(rtype, repo_id)
        if not path.is_file():
            raise HubError(404, f"Repository Not Found for url: {repo_id}", "RepoNotFound")
        return json.loads(path.read_text(encoding="utf-8"))

    def save(self, rtype: str, repo_id: str, repo: dict[str, Any]) -> None:
        path = self.repo_file(rtype, repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write(path, json.dumps(repo).encode())

    @staticmethod
    def resolve(repo: dict[str, Any], rev: str) -> str:
        rev = unquote(rev)
        for kind in ("branches", "tags"):
            if rev in repo["refs"][kind]:
                return repo["refs"][kind][rev]
        if rev.removeprefix("refs/heads/") in repo["refs"]["branches"]:
            return repo["refs"]["branches"][rev.removeprefix("refs/heads/")]
        if rev in repo["commits"]:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    @staticmethod
    def add_commit(repo: dict[str, Any], parent: str | None, tree: dict[str, Any], title: str, message: str) -> str:
        body = {"parent": parent, "tree": tree, "title": title, "message": message, "date": time.time()}
        oid = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        repo["commits"][oid] = body
        return oid


def _tree_entry(path: str, e: dict[str, Any], expand: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
    if e.get("lfs"):
        out["lfs"] = {"oid": e["lfs"], "size": e["size"], "pointerSize": len(lfs_pointer(e["lfs"], e["size"]))}
    if expand:
        out["lastCommit"] = None
        out["securityFileStatus"] = None
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the client reports what matters
        pass

    # --- plumbing ---------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def store(self) -> Store:
        return self.server.store

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _authorized(self) -> bool:
        if self.state.token is None:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {self.state.token}"

    def _require_auth(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header", "Unauthorized")

    def _readable(self, repo: dict[str, Any], repo_id: str) -> None:
        # Private and gated repositories need a valid token (accepting a gated repo's license is
        # implied by having one here: there is one user).
        if (repo.get("private") or repo.get("gated")) and not self._authorized():
            raise HubError(401 if repo.get("gated") else 404, f"Access to {repo_id} is restricted", "GatedRepo")

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with self.state.lock:
            self.state.requests.append(f"{self.command} {path}")
        try:
            self._route(path, query)
        except HubError as exc:
            headers = {"X-Error-Message": exc.message}
            if exc.error_code:
                headers["X-Error-Code"] = exc.error_code
            self._json({"error": exc.message}, exc.status, headers)
        except (json.JSONDecodeError, KeyError, ValueError) as exc:
            self._json({"error": f"bad request: {exc}"}, 400, {"X-Error-Message": f"bad request: {exc}"})

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch

    # --- routes -----------------------------------------------------------------------------------
    def _route(self, path: str, query: dict[str, list[str]]) -> None:
        m, c = None, self.command
        if c == "GET" and path == "/api/whoami-v2":
            self._require_auth()
            return self._json({"type": "user", "name": "local", "auth": {"accessToken": {"role": "write"}}})
        if c == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if c == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml()
        if c == "PUT" and path.startswith("/lfs-upload/"):
            return self._lfs_upload(path.removeprefix("/lfs-upload/"))
        if c == "POST" and path.startswith("/lfs-verify/"):
            return self._lfs_verify(path.removeprefix("/lfs-verify/"))
        if (m := _LFS_BATCH.match(path)) and c == "POST":
            return self._lfs_batch((m.group(1) or "models").rstrip("s"), m.group(2))
        if (m := _RESOLVE.match(path)) and c in ("GET", "HEAD"):
            return self._resolve((m.group(1) or "models").rstrip("s"), m.group(2), m.group(3), m.group(4))
        if m := _API_REPO.match(path):
            rtype, repo_id, rest = m.group(1).rstrip("s"), m.group(2), m.group(3) or ""
            return self._repo_api(rtype, repo_id, rest, query)
        raise HubError(404, f"no route for {c} {path}")

    def _create_repo(self) -> None:
        self._require_auth()
        body = json.loads(self._body() or b"{}")
        rtype = body.get("type") or "model"
        repo_id = f"{body.get('organization') or 'local'}/{body['name']}"
        with self.state.lock:
            path = self.store.repo_file(rtype, repo_id)
            if path.exists():  # the Hub answers 409 with the repository's URL
                prefix = "" if rtype == "model" else f"{rtype}s/"
                url = f"{self.server.url}/{prefix}{repo_id}"
                return self._json({"error": "You already created this model repo", "url": url}, 409,
                                  {"X-Error-Message": "You already created this model repo"})  # fmt: skip
            repo: dict[str, Any] = {"id": repo_id, "type": rtype, "private": body.get("visibility") == "private",
                                    "gated": False, "commits": {}, "refs": {"branches": {}, "tags": {}},
                                    "created": time.time()}  # fmt: skip
            attrs = GITATTRIBUTES.encode()
            tree = {".gitattributes": {"oid": self.store.put_blob(attrs), "size": len(attrs)}}
            repo["refs"]["branches"]["main"] = Store.add_commit(repo, None, tree, "initial commit", "")
            self.store.save(rtype, repo_id, repo)
        prefix = "" if rtype == "model" else f"{rtype}s/"
        self._json({"url": f"{self.server.url}/{prefix}{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        """The client checks a README's front matter here before committing it."""
        import yaml

        content = json.loads(self._body() or b"{}").get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        errors = []
        if m:
            try:
                data = yaml.safe_load(m.group(1))
                if data is not None and not isinstance(data, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML: {exc}"})
        warnings = [] if m else [{"message": "empty or missing yaml metadata in repo card"}]
        self._json({"errors": errors, "warnings": warnings}, 400 if errors else 200)

    def _repo_api(self, rtype: str, repo_id: str, rest: str, query: dict[str, list[str]]) -> None:
        c = self.command
        with self.state.lock:
            repo = self.store.load(rtype, repo_id)
        if rest == "" or rest.startswith("revision/"):
            if c != "GET":
                raise HubError(405, "method not allowed")
            self._readable(repo, repo_id)
            return self._info(repo, unquote(rest.removeprefix("revision/")) or "main")
        if rest.startswith("preupload/") and c == "POST":
            self._require_auth()
            return self._preupload(repo, rest.removeprefix("preupload/"))
        if rest.startswith("commit/") and c == "POST":
            self._require_auth()
            return self._commit(rtype, repo_id, rest.removeprefix("commit/"))
        if rest.startswith("tree/") and c == "GET":
            self._readable(repo, repo_id)
            rev, _, sub = rest.removeprefix("tree/").partition("/")
            return self._tree(repo, rev, sub, query)
        if rest.startswith("paths-info/") and c == "POST":
            self._readable(repo, repo_id)
            return self._paths_info(repo, rest.removeprefix("paths-info/"))
        if rest == "refs" and c == "GET":
            self._readable(repo, repo_id)
            return self._refs(repo)
        if rest.startswith(("tag/", "branch/")) and c in ("POST", "DELETE"):
            self._require_auth()
            return self._ref(rtype, repo_id, rest)
        if rest.startswith(("xet-write-token", "xet-read-token")):  # a client with Xet switched on
            raise HubError(501, "this local Hub speaks git-LFS, not Xet: set HF_HUB_DISABLE_XET=1 in the client")
        if rest == "settings" and c == "PUT":
            self._require_auth()
            body = json.loads(self._body() or b"{}")
            with self.state.lock:
                repo = self.store.load(rtype, repo_id)
                if "gated" in body:
                    if body["gated"] not in (False, "auto", "manual"):
                        raise HubError(400, "gated must be false, 'auto' or 'manual'")
                    repo["gated"] = body["gated"]
                if "visibility" in body or "private" in body:
                    repo["private"] = body.get("visibility") == "private" or bool(body.get("private"))
                self.store.save(rtype, repo_id, repo)
            return self._json({})
        raise HubError(404, f"no route for {c} /api/{rtype}s/{repo_id}/{rest}")

    def _info(self, repo: dict[str, Any], rev: str) -> None:
        oid = Store.resolve(repo, rev)
        tree = repo["commits"][oid]["tree"]
        siblings = []
        for p, e in sorted(tree.items()):
            s: dict[str, Any] = {"rfilename": p, "size": e["size"], "blobId": e["oid"]}
            if e.get("lfs"):
                s["lfs"] = {"sha256": e["lfs"], "size": e["size"], "pointerSize": len(lfs_pointer(e["lfs"], e["size"]))}
            siblings.append(s)
        created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo["created"]))
        modified = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo["commits"][oid]["date"]))
        self._json({"_id": repo["id"], "id": repo["id"], "modelId": repo["id"], "sha": oid, "private": repo["private"],
                    "gated": repo["gated"], "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                    "siblings": siblings, "createdAt": created, "lastModified": modified})  # fmt: skip

    def _preupload(self, repo: dict[str, Any], rev: str) -> None:
        body = json.loads(self._body())
        try:
            tree = repo["commits"][Store.resolve(repo, rev)]["tree"]
        except HubError:
            tree = {}  # a new branch: nothing there yet
        files = []
        for f in body["files"]:
            lfs = is_lfs(f["path"], int(f["size"]), base64.b64decode(f.get("sample", "")))
            e = tree.get(f["path"])
            oid = (e.get("lfs") if lfs else (None if e.get("lfs") else e["oid"])) if e else None
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})  # fmt: skip
        self._json({"files": files, "commitOid": None})

    def _lfs_batch(self, rtype: str, repo_id: str) -> None:
        self._require_auth()
        with self.state.lock:
            self.store.load(rtype, repo_id)  # 404 for an unknown repo
        body = json.loads(self._body())
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "only basic upload transfers are supported here")
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.store.lfs_path(oid).is_file():  # already stored: no actions, the client skips it
                entry["actions"] = {
                    "upload": {"href": f"{self.server.url}/lfs-upload/{oid}/{size}", "header": {}},
                    "verify": {"href": f"{self.server.url}/lfs-verify/{oid}", "header": {}},
                }
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   headers={"Content-Type": "application/vnd.git-lfs+json"})  # fmt: skip

    def _lfs_upload(self, rest: str) -> None:
        oid, _, size = rest.partition("/")
        target = self.store.lfs_path(oid)
        with self.state.lock:  # uploads run in parallel: admit them one by one against the hold
            hold = (
                self.state.hold_uploads_after is not None and self.state.lfs_admitted >= self.state.hold_uploads_after
            )
            self.state.lfs_admitted += 0 if hold else 1
        if hold:  # a test cuts the publisher off here; nothing of this upload is stored
            self.state.released.wait()
            raise HubError(503, "server going away")
        data = self._body()
        if len(data) != int(size) or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"upload of {oid} does not match its oid or size")
        self.store._write(target, data)
        with self.state.lock:
            self.state.lfs_uploads += 1
        self._send(200)

    def _lfs_verify(self, oid: str) -> None:
        body = json.loads(self._body() or b"{}")
        p = self.store.lfs_path(oid)
        if not p.is_file() or p.stat().st_size != int(body.get("size", -1)):
            raise HubError(404, f"object {oid} not stored")
        self._json({"message": "ok"})

    def _commit(self, rtype: str, repo_id: str, rev: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), None)
        if header is None:
            raise HubError(400, "commit without header")
        rev = unquote(rev)
        with self.state.lock:
            repo = self.store.load(rtype, repo_id)
            if rev not in repo["refs"]["branches"]:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo["refs"]["branches"][rev]
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo["commits"][head]["tree"])
            for op in lines:
                v = op["value"]
                if op["key"] == "file":
                    data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                    tree[v["path"]] = {"oid": self.store.put_blob(data), "size": len(data)}
                elif op["key"] == "lfsFile":
                    p = self.store.lfs_path(v["oid"])
                    if not p.is_file() or p.stat().st_size != int(v["size"]):
                        raise HubError(422, f"LFS object {v['oid']} for {v['path']} was not uploaded")
                    pointer = lfs_pointer(v["oid"], int(v["size"]))
                    tree[v["path"]] = {"oid": git_blob_sha1(pointer), "size": int(v["size"]), "lfs": v["oid"]}
                elif op["key"] == "deletedFile":
                    if v["path"] not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {v['path']}")
                    del tree[v["path"]]
                elif op["key"] == "deletedFolder":
                    prefix = v["path"].rstrip("/") + "/"
                    for p in [p for p in tree if p.startswith(prefix)]:
                        del tree[p]
                elif op["key"] != "header":
                    raise HubError(400, f"unsupported commit operation {op['key']}")
            oid = Store.add_commit(repo, head, tree, header.get("summary", ""), header.get("description", ""))
            repo["refs"]["branches"][rev] = oid
            self.store.save(rtype, repo_id, repo)
        prefix = "" if rtype == "model" else f"{rtype}s/"
        self._json({"commitUrl": f"{self.server.url}/{prefix}{repo_id}/commit/{oid}", "commitOid": oid,
                    "pullRequestUrl": None, "success": True})  # fmt: skip

    def _tree(self, repo: dict[str, Any], rev: str, sub: str, query: dict[str, list[str]]) -> None:
        tree = repo["commits"][Store.resolve(repo, rev)]["tree"]
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"path {sub} not found", "EntryNotFound")
        out, dirs = [], set()
        for p, e in sorted(tree.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :]
            if "/" in rel and not recursive:
                dirs.add(prefix + rel.split("/", 1)[0])
                continue
            if recursive:
                parts = p.split("/")[:-1]
                dirs.update(
                    "/".join(parts[: i + 1]) for i in range(len(parts)) if "/".join(parts[: i + 1]) + "/" > prefix
                )
            out.append(_tree_entry(p, e, "expand" in query))
        out += [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(dirs)
        ]
        self._json(out)

    def _paths_info(self, repo: dict[str, Any], rev: str) -> None:
        raw = self._body().decode()
        ctype = self.headers.get("Content-Type", "")
        form = json.loads(raw) if "json" in ctype else parse_qs(raw)
        paths = form.get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        tree = repo["commits"][Store.resolve(repo, rev)]["tree"]
        out = [_tree_entry(p, tree[p]) for p in paths if p in tree]
        out += [{"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
                for p in paths if p not in tree and any(k.startswith(p.rstrip("/") + "/") for k in tree)]  # fmt: skip
        self._json(out)

    def _refs(self, repo: dict[str, Any]) -> None:
        def refs(kind: str, prefix: str) -> list[dict[str, str]]:
            return [
                {"name": n, "ref": f"{prefix}{n}", "targetCommit": c} for n, c in sorted(repo["refs"][kind].items())
            ]

        self._json({"branches": refs("branches", "refs/heads/"), "tags": refs("tags", "refs/tags/"), "converts": []})

    def _ref(self, rtype: str, repo_id: str, rest: str) -> None:
        kind, _, name = rest.partition("/")
        body = json.loads(self._body() or b"{}")
        with self.state.lock:
            repo = self.store.load(rtype, repo_id)
            if kind == "tag" and self.command == "POST":  # POST tag/<revision> {"tag": name}
                target = Store.resolve(repo, name)
                if body["tag"] in repo["refs"]["tags"]:
                    raise HubError(409, f"Tag {body['tag']} already exists", "TagExists")
                repo["refs"]["tags"][body["tag"]] = target
            elif kind == "branch" and self.command == "POST":
                if name in repo["refs"]["branches"]:
                    raise HubError(409, f"Branch {name} already exists", "BranchExists")
                repo["refs"]["branches"][name] = Store.resolve(repo, body.get("startingPoint") or "main")
            else:
                refs = repo["refs"]["tags" if kind == "tag" else "branches"]
                if name not in refs:
                    raise HubError(404, f"{kind} {name} not found")
                del refs[name]
            self.store.save(rtype, repo_id, repo)
        self._json({})

    def _resolve(self, rtype: str, repo_id: str, rev: str, path: str) -> None:
        with self.state.lock:
            repo = self.store.load(rtype, repo_id)
        self._readable(repo, repo_id)
        oid = Store.resolve(repo, rev)
        e = repo["commits"][oid]["tree"].get(path)
        if e is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        blob = self.store.lfs_path(e["lfs"]) if e.get("lfs") else self.store.blob_path(e["oid"])
        headers = {"X-Repo-Commit": oid, "ETag": f'"{e["oid"]}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        if e.get("lfs"):
            headers |= {"X-Linked-Etag": f'"{e["lfs"]}"', "X-Linked-Size": str(e["size"])}
        start = 0
        rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if rng and int(rng.group(1)) < e["size"]:
            start = int(rng.group(1))
            headers["Content-Range"] = f"bytes {start}-{e['size'] - 1}/{e['size']}"
        if self.command == "HEAD":
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(e["size"]))
            self.end_headers()
            return
        with open(blob, "rb") as f:
            f.seek(start)
            self._send(206 if start else 200, f.read(), headers)


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self.state = HubState(Path(root), token)
        self.store = Store(self.state)
        super().__init__((host, port), Handler)
        self.url = f"http://{host}:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-request (a killed publisher) is not a server error."""
        import sys

        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, HubError)):
            super().handle_error(request, client_address)

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.released.set()
        self.shutdown()
        self.server_close()
