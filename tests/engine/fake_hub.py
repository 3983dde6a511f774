"""A tiny stand-in for the Hugging Face Hub's file endpoints, for `HF_ENDPOINT` in tests.

It serves model repos held in memory the way huggingface.co does for `huggingface_hub`:

- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}`: repo info with `sha`
  and `siblings`;
- `GET /api/models/{repo}/tree/{rev}[/{path}]`: the file listing (`type`, `path`, `size`,
  `oid`, and `lfs` for large files);
- `HEAD`/`GET /{repo}/resolve/{rev}/{file}`: small files served directly with `ETag`,
  `X-Repo-Commit` and `Content-Length`; "LFS" files (weights) answered with a 302 to a CDN
  path plus `X-Linked-Etag` / `X-Linked-Size`, as the Hub does;
- `GET /cdn/{sha256}`: the bytes, honouring `Range` so downloads can resume;
- unknown repos, revisions and files get 404s with the Hub's `X-Error-Code` header.

`chunk_delay` slows every 64 KiB so tests can cancel a download mid-way. Every request
is recorded in `requests` as (method, path).
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

CHUNK = 64 * 1024
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")


class FakeRepo:
    """One model repo: path -> bytes, at one commit."""

    def __init__(self, repo_id: str, files: dict[str, bytes]) -> None:
        self.repo_id = repo_id
        self.files = files
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha1(files[path]).digest())
        self.commit = digest.hexdigest()  # 40 hex chars, like a git commit

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def git_oid(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def sha256(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest()

    def etag(self, path: str) -> str:
        return self.sha256(path) if self.is_lfs(path) else self.git_oid(path)

    def tree(self) -> list[dict[str, Any]]:
        entries = []
        for path in sorted(self.files):
            size = len(self.files[path])
            entry: dict[str, Any] = {
                "type": "file",
                "oid": self.git_oid(path),
                "size": size,
                "path": path,
            }
            if self.is_lfs(path):
                entry["lfs"] = {"oid": self.sha256(path), "size": size, "pointerSize": 134}
            entries.append(entry)
        return entries

    def info(self) -> dict[str, Any]:
        return {
            "_id": self.commit[:24],
            "id": self.repo_id,
            "modelId": self.repo_id,
            "sha": self.commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": "2024-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p} for p in sorted(self.files)],
        }


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 serving `FakeRepo`s; use as a context manager."""

    def __init__(self, repos: list[FakeRepo], *, chunk_delay: float = 0.0) -> None:
        self.repos = {r.repo_id: r for r in repos}
        self.chunk_delay = chunk_delay
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(_Handler):
            owner = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_url(self) -> str:
        """The same server under another host name, as the Hub's CDN is another host."""
        return f"http://localhost:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def by_sha256(self, sha: str) -> bytes | None:
        for repo in self.repos.values():
            for path in repo.files:
                if repo.is_lfs(path) and repo.sha256(path) == sha:
                    return repo.files[path]
        return None


class _Handler(BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    # -- helpers ---------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data: Any) -> None:
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                  "X-Error-Message": message})  # fmt: skip

    def _repo(self, org: str, name: str) -> FakeRepo | None:
        return self.owner.repos.get(f"{org}/{name}")

    def _revision_ok(self, repo: FakeRepo, rev: str) -> bool:
        return rev in ("main", repo.commit)

    def _stream(self, data: bytes, headers: dict[str, str]) -> None:
        """Send `data`, honouring a `Range: bytes=N-` request."""
        start = 0
        status = 200
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            first = range_header[len("bytes=") :].split("-", 1)[0]
            if first.isdigit() and int(first) < len(data):
                start, status = int(first), 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(data) - start)
        headers["Accept-Ranges"] = "bytes"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        for offset in range(start, len(data), CHUNK):
            try:
                self.wfile.write(data[offset : offset + CHUNK])
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
            if self.owner.chunk_delay:
                time.sleep(self.owner.chunk_delay)

    # -- routes ----------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        path = urlparse(self.path).path
        self.owner.requests.append((self.command, path))
        parts = [unquote(p) for p in path.split("/") if p]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(parts[2], parts[3], parts[4:])
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(parts[0], parts[1], parts[3], "/".join(parts[4:]))
        elif len(parts) == 2 and parts[0] == "cdn":
            data = self.owner.by_sha256(parts[1])
            if data is None:
                self._error(404, "EntryNotFound", "No such object")
            else:
                self._stream(data, {"Content-Type": "application/octet-stream",
                                    "ETag": f'"{parts[1]}"'})  # fmt: skip
        else:
            self._error(404, "RepoNotFound", "Not found")

    def _api(self, org: str, name: str, rest: list[str]) -> None:
        repo = self._repo(org, name)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return
        if not rest:
            self._json(repo.info())
        elif rest[0] == "revision" and len(rest) >= 2:
            if not self._revision_ok(repo, rest[1]):
                self._error(404, "RevisionNotFound", "Invalid rev id")
            else:
                self._json(repo.info())
        elif rest[0] == "tree" and len(rest) >= 2:
            if not self._revision_ok(repo, rest[1]):
                self._error(404, "RevisionNotFound", "Invalid rev id")
                return
            prefix = "/".join(rest[2:])
            entries = [e for e in repo.tree() if not prefix or e["path"].startswith(prefix + "/")]
            self._json(entries)
        else:
            self._error(404, "EntryNotFound", "Not found")

    def _resolve(self, org: str, name: str, rev: str, file: str) -> None:
        repo = self._repo(org, name)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return
        if not self._revision_ok(repo, rev):
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return
        if file not in repo.files:
            self._error(404, "EntryNotFound", "Entry not found")
            return
        size = str(len(repo.files[file]))
        if repo.is_lfs(file):
            sha = repo.sha256(file)
            self._send(
                302,
                b"",
                {
                    # Another host name, like the Hub's CDN: huggingface_hub follows a
                    # HEAD redirect only on the same host (which means "repo renamed").
                    "Location": f"{self.owner.cdn_url}/cdn/{sha}",
                    "X-Repo-Commit": repo.commit,
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": size,
                    "ETag": f'"{repo.git_oid(file)}"',
                },
            )
            return
        self._stream(
            repo.files[file],
            {
                "Content-Type": "application/octet-stream",
                "X-Repo-Commit": repo.commit,
                "ETag": f'"{repo.etag(file)}"',
            },
        )


# -- small but valid model files -----------------------------------------------------------------


def safetensors_bytes(tensors: dict[str, list[int]]) -> bytes:
    """A valid F32 safetensors file with zero-filled tensors of the given shapes."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        header[name] = {
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [offset, offset + 4 * count],
        }
        offset += 4 * count
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


def tiny_hf_files(n_weights: int = 1000) -> dict[str, bytes]:
    """A tiny Llama-shaped Hugging Face model folder: config, weights, tokenizer files."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 64,
        "max_position_embeddings": 512,
        "torch_dtype": "bfloat16",
    }
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": safetensors_bytes({"w": [n_weights]}),
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b"{}",
        "README.md": b"# tiny\n",
    }


def _gguf_str(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_bytes(metadata: dict[str, Any], tensors: dict[str, list[int]] | None = None, padding: int = 0) -> bytes:
    """A GGUF v3 header with the given metadata and tensor shapes (F32), then `padding` zero bytes.

    Values: str -> string, bool -> bool, int -> uint32 (int64 if large/negative),
    float -> float32, list[int] -> array of uint32. Tensor data is not written.
    """
    tensors = tensors or {}
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        out += _gguf_str(key)
        if isinstance(value, bool):
            out += struct.pack("<I?", 7, value)
        elif isinstance(value, str):
            out += struct.pack("<I", 8) + _gguf_str(value)
        elif isinstance(value, int) and 0 <= value < 2**32:
            out += struct.pack("<II", 4, value)
        elif isinstance(value, int):
            out += struct.pack("<Iq", 11, value)
        elif isinstance(value, float):
            out += struct.pack("<If", 6, value)
        elif isinstance(value, list):
            out += struct.pack("<IIQ", 9, 4, len(value)) + struct.pack(f"<{len(value)}I", *value)
        else:
            raise TypeError(type(value))
    for name, shape in tensors.items():
        out += _gguf_str(name) + struct.pack("<I", len(shape))
        out += struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<IQ", 0, 0)
    return bytes(out) + b"\0" * padding


def tiny_gguf(n_ctx: int = 2048, padding: int = 0) -> bytes:
    """A GGUF header shaped like a small Llama (4 layers, 8 heads, 2 KV heads, width 256)."""
    return gguf_bytes(
        {
            "general.architecture": "llama",
            "general.file_type": 15,  # Q4_K_M
            "llama.block_count": 4,
            "llama.context_length": n_ctx,
            "llama.embedding_length": 256,
            "llama.attention.head_count": 8,
            "llama.attention.head_count_kv": 2,
        },
        {"token_embd.weight": [256, 1000], "output.weight": [256, 1000]},
        padding,
    )
