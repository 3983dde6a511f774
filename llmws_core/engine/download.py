"""Model downloads as background jobs: Hugging Face repos through `huggingface_hub`, other git
repos through `git` + `git-lfs`.

Every download runs in a child process (the `huggingface_hub` worker at the bottom of
this file, or `git`), so it never blocks the event loop and cancelling is a kill, not a
polite request a library may ignore. Files land in `var/models/.<target>.partial/` and
the folder is renamed to `var/models/<target>` only when complete and checked, so a
half-finished download never shows up as a model. Progress is measured by watching the
bytes arrive on disk, which works the same for every `huggingface_hub` version and for
git-lfs.

Events go to the `on_event` callback given to `start`, always on the event loop thread.
Messages sent to clients are written here; library and git output goes to the server log.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import glob
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from llmws_core.engine import gguf
from llmws_core.engine.scan import PARTIAL_MARKER, ModelDirs
from llmws_core.errors import BadRequest, Busy, DownloadError, Forbidden

logger = logging.getLogger("llmws.engine.download")

GiB = 1024 * 1024 * 1024
#: Progress events per job are at least this many seconds apart (so at most ~4 per second).
PROGRESS_INTERVAL = 0.25
#: Log lines relayed from git's own progress output are at least this far apart.
LOG_INTERVAL = 1.0
#: Files of a Hugging Face model folder worth downloading (weights, configs, tokenizer).
HF_FOLDER_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".tiktoken", ".jinja")
#: Transports git may use; `ext::` and friends can run commands and are never allowed.
GIT_PROTOCOLS = "file:git:http:https:ssh"

_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
#: A GGUF quantization tag as file names carry it: Q4_K_M, Q8_0, IQ4_XS, F16, BF16, ...
_QUANT_RE = re.compile(r"^(I?Q[1-8](_[A-Z0-9]{1,2}){0,2}|B?F(16|32)|TQ[12]_0)$", re.I)
_HF_HOSTS = {"huggingface.co", "www.huggingface.co", "hf.co"}
_SCP_GIT_RE = re.compile(r"^[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+:[^\s]+$")
_GIT_PROGRESS_RE = re.compile(
    r"^(?:remote: )?(Enumerating|Counting|Compressing|Receiving|Resolving|Updating|Filtering|"
    r"Downloading LFS|Checking out)[^\n]*\d+%"
)
_LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"


# -- what to download ------------------------------------------------------------------------


@dataclass(frozen=True)
class HfSource:
    """A Hugging Face model repo, optionally one file of it."""

    repo_id: str
    revision: str = "main"
    filename: str | None = None
    #: A quantization tag (Q4_K_M, Q8_0, ...): the GGUF file of that quantization.
    quant: str | None = None


@dataclass(frozen=True)
class GitSource:
    """Any other git repository, cloned with its LFS objects."""

    url: str


def _hf_endpoint_host() -> str | None:
    endpoint = os.environ.get("HF_ENDPOINT")
    return urlparse(endpoint).netloc.lower() if endpoint else None


def parse_source(repo: str, filename: str | None = None, quant: str | None = None) -> HfSource | GitSource:
    """Decide how `repo` is downloaded: a Hub repo id or URL, or a git URL.

    `quant` (a Hub repo only) picks the GGUF file of that quantization.

    Raises:
        BadRequest: `repo` is neither, or `quant` is not a quantization tag.
    """
    if quant is not None and not _QUANT_RE.match(quant):
        raise BadRequest("The quantization tag must look like Q4_K_M, Q8_0, IQ4_XS, F16 or BF16.")
    text = (repo or "").strip()
    if not text or text.startswith("-") or any(c.isspace() or ord(c) < 32 for c in text):
        raise BadRequest("repo must be a Hugging Face repo id (org/name) or a git URL.")
    if filename is not None and (
        not filename or filename.startswith("/") or ".." in filename.split("/") or "\x00" in filename
    ):
        raise Forbidden("filename must be a plain file name inside the repository.")
    if _HF_REPO_RE.match(text) and ".." not in text:
        return HfSource(text, filename=filename, quant=quant)
    parsed = urlparse(text)
    host = parsed.netloc.lower()
    if parsed.scheme in ("http", "https") and (host in _HF_HOSTS or host == _hf_endpoint_host()):
        parts = [unquote(p) for p in parsed.path.split("/") if p]
        if parts and parts[0] in ("datasets", "spaces"):
            raise BadRequest("Only model repositories can be downloaded, not datasets or spaces.")
        if len(parts) < 2:
            raise BadRequest("That Hugging Face URL does not name a repository (org/name).")
        repo_id = f"{parts[0]}/{parts[1].removesuffix('.git')}"
        if not _HF_REPO_RE.match(repo_id) or ".." in repo_id:
            raise BadRequest("That Hugging Face URL does not name a valid repository.")
        revision = "main"
        if len(parts) >= 4 and parts[2] in ("tree", "resolve", "blob"):
            revision = parts[3]
            if parts[2] in ("resolve", "blob") and len(parts) >= 5 and filename is None:
                filename = "/".join(parts[4:])
        return HfSource(repo_id, revision, filename, quant)
    if parsed.scheme in ("http", "https", "ssh", "git", "file") and (parsed.netloc or parsed.path):
        return GitSource(text)
    if _SCP_GIT_RE.match(text):
        return GitSource(text)
    raise BadRequest("repo must be a Hugging Face repo id (org/name) or a git URL.")


def choose_hf_files(sizes: dict[str, int], filename: str | None, quant: str | None = None) -> list[str]:
    """The files of a Hub repo to fetch.

    A named file (with its split parts); else one GGUF -- the one of quantization
    `quant` when given, else Q4_K_M, else the first Q4, else the first -- when the repo
    has any; else the top-level safetensors, configs and tokenizer files of a Hugging
    Face model folder.

    Raises:
        DownloadError: the named file is missing, no GGUF has quantization `quant`, or
            the repo holds no usable weights.
    """
    if filename:
        matches = [p for p in sizes if p == filename] or [
            p for p in sizes if p.rsplit("/", 1)[-1].lower() == filename.lower()
        ]
        if not matches:
            raise DownloadError(f"The repository has no file named '{filename[:120]}'.")
        return _with_split_parts(matches[0], sizes)
    ggufs = [
        p
        for p in sorted(sizes)
        if p.lower().endswith(".gguf")
        and not p.rsplit("/", 1)[-1].lower().startswith("mmproj")  # vision projectors
        and not gguf.is_later_part(p.rsplit("/", 1)[-1])
    ]
    if ggufs and quant:
        tagged = [
            p for p in ggufs if re.search(rf"(?<![a-z0-9]){re.escape(quant)}(?![a-z0-9_])", p.rsplit("/", 1)[-1], re.I)
        ]
        if not tagged:
            raise DownloadError(f"The repository has no GGUF file of quantization {quant}.")
        return _with_split_parts(tagged[0], sizes)
    if ggufs:
        q4 = [p for p in ggufs if re.search(r"(?<![a-z])i?q4", p.rsplit("/", 1)[-1], re.I)]
        preferred = [p for p in q4 if "q4_k_m" in p.lower()]
        chosen = (preferred or q4 or ggufs)[0]
        return _with_split_parts(chosen, sizes)
    top = [p for p in sizes if "/" not in p]
    if not any(p.endswith(".safetensors") for p in top):
        raise DownloadError("The repository has neither a GGUF file nor safetensors weights.")
    return sorted(p for p in top if p.endswith(HF_FOLDER_SUFFIXES))


def _with_split_parts(path: str, sizes: dict[str, int]) -> list[str]:
    """`path`, and if it is part 1 of a split GGUF, all its parts."""
    folder, _, name = path.rpartition("/")
    names = gguf.part_names(name)
    if len(names) == 1:
        return [path]
    prefix = f"{folder}/" if folder else ""
    return [p for p in (prefix + n for n in names) if p in sizes]


# -- jobs ------------------------------------------------------------------------------------


class _Cancelled(Exception):
    """The job was cancelled by `cancel` (not an error for the log)."""


@dataclass
class _Job:
    job_id: str
    repo: str
    target: str
    source: HfSource | GitSource
    on_event: Callable[[dict[str, Any]], None]
    partial: Path
    final: Path
    state: str = "running"  # running | done | failed | cancelled
    file: str | None = None
    done: int = 0
    total: int | None = None
    path: str | None = None
    message: str | None = None
    started: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class _Progress:
    """Turns byte counts into throttled `download_progress` events with rate and ETA."""

    def __init__(self, job: _Job, emit: Callable[[dict[str, Any]], None]) -> None:
        self.job = job
        self.emit = emit
        self.samples: collections.deque[tuple[float, int]] = collections.deque()
        self.last_emit = 0.0
        self.last_sent: tuple[int, int | None, str | None] | None = None

    def update(self, done: int, total: int | None, file: str | None, *, force: bool = False) -> None:
        job = self.job
        if total is not None:
            done = min(done, total)
        job.done, job.total, job.file = done, total, file
        now = time.monotonic()
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > 3.0:
            self.samples.popleft()
        if (done, total, file) == self.last_sent:
            return
        if not force and now - self.last_emit < PROGRESS_INTERVAL:
            return
        (t0, d0) = self.samples[0]
        rate = (done - d0) / (now - t0) if now - t0 > 0.05 else 0.0
        eta = (total - done) / rate if total is not None and rate > 0 else None
        self.last_emit, self.last_sent = now, (done, total, file)
        self.emit(
            {
                "type": "download_progress",
                "job_id": job.job_id,
                "file": file,
                "done": done,
                "total": total,
                "rate": round(max(rate, 0.0), 1),
                "eta": round(eta, 1) if eta is not None else None,
            }
        )

    async def finish(self, done: int, total: int | None, file: str | None) -> None:
        """Send the final figures, waiting out the throttle rather than dropping them."""
        wait = PROGRESS_INTERVAL - (time.monotonic() - self.last_emit)
        if wait > 0 and self.last_sent != (min(done, total or done), total, file):
            await asyncio.sleep(wait)
        self.update(done, total, file, force=True)


def _tree_bytes(root: Path) -> int:
    """Bytes of regular files under `root` (symlinks not followed)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(dirpath, name)):
                total += st.st_size
    return total


def _lfs_pointers(root: Path) -> list[tuple[str, int]]:
    """(relative path, real size) of every git-lfs pointer file in a checkout."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            path = Path(dirpath) / name
            try:
                if path.is_symlink() or path.stat().st_size > 1024:
                    continue
                head = path.read_bytes()
            except OSError:
                continue
            if head.startswith(_LFS_POINTER_PREFIX):
                match = re.search(rb"^size (\d+)$", head, re.MULTILINE)
                if match:
                    found.append((path.relative_to(root).as_posix(), int(match[1])))
    return found


def _contains_model(root: Path) -> bool:
    """Whether a finished download holds a GGUF file or a Hugging Face folder (3 levels deep)."""
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if len(Path(dirpath).parts) - base_depth >= 3:
            dirnames[:] = []
        if any(f.lower().endswith(".gguf") for f in filenames):
            return True
        if "config.json" in filenames and any(f.endswith(".safetensors") for f in filenames):
            return True
    return False


def _remove_escaping_symlinks(root: Path) -> list[str]:
    """Delete symlinks that point outside `root` or are absolute (they would break on rename)."""
    removed = []
    real_root = Path(os.path.realpath(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                continue
            target = os.readlink(path)
            real = Path(os.path.realpath(path))
            if os.path.isabs(target) or not (real == real_root or real_root in real.parents):
                path.unlink()
                removed.append(path.relative_to(root).as_posix())
    return removed


def _free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill a child and everything it started (git spawns helpers; each job is its own group)."""
    if proc.returncode is not None:
        return
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


class DownloadManager:
    """Runs model downloads as background jobs with progress events, limits and cancellation.

    Args:
        dirs: the model folders; downloads go to `dirs.var_models_dir`.
        max_concurrent: downloads running at once; more are refused with `Busy`.
        min_free_bytes: free disk that must remain after (and before) a download.
        max_bytes: the largest download accepted; None means no limit.
        allow_file_urls: whether `file://` git URLs (repositories on the server's own
            disk) may be downloaded; tests use them, a shared server may turn them off.
    """

    #: Finished jobs kept for `jobs()`; older ones are forgotten.
    KEEP_FINISHED = 50

    def __init__(
        self,
        dirs: ModelDirs,
        *,
        max_concurrent: int = 2,
        min_free_bytes: int = 1 * GiB,
        max_bytes: int | None = None,
        allow_file_urls: bool = True,
    ) -> None:
        self.dirs = dirs
        self.allow_file_urls = allow_file_urls
        self.max_concurrent = max_concurrent
        self.min_free_bytes = min_free_bytes
        self.max_bytes = max_bytes
        self._jobs: dict[str, _Job] = {}

    # -- public ----------------------------------------------------------------------------

    async def start(
        self,
        repo: str,
        target_dir: str,
        on_event: Callable[[dict[str, Any]], None],
        filename: str | None = None,
        quant: str | None = None,
    ) -> str:
        """Check the request and start a download job; returns its job id.

        Raises:
            Forbidden: `target_dir` is not a single folder name in var/models/.
            BadRequest: `repo` is not a Hub repo id or git URL.
            DownloadError: the target exists already, or the disk is nearly full.
            Busy: too many downloads are running, or this target is being downloaded.
        """
        final = self.dirs.target_dir(target_dir)
        source = parse_source(repo, filename, quant)
        if isinstance(source, GitSource) and not self.allow_file_urls:
            if urlparse(source.url).scheme == "file":
                raise Forbidden("file:// URLs are disabled on this server.")
        running = [j for j in self._jobs.values() if j.state == "running"]
        if any(j.target == target_dir for j in running):
            raise Busy(f"'{target_dir}' is already being downloaded.")
        if len(running) >= self.max_concurrent:
            raise Busy(
                f"{len(running)} downloads are running (the limit is {self.max_concurrent}); "
                "wait for one to finish or cancel one."
            )
        if os.path.lexists(final):
            raise DownloadError(f"var/models/{target_dir} exists already; delete it or choose another target_dir.")
        free = _free_bytes(self.dirs.var_models_dir)
        if free < self.min_free_bytes:
            raise DownloadError(
                f"Not enough free disk: {free / GiB:.1f} GiB free, "
                f"at least {self.min_free_bytes / GiB:.1f} GiB must stay free."
            )
        self.dirs.var_models_dir.mkdir(parents=True, exist_ok=True)
        partial = self.dirs.var_models_dir / f".{target_dir}.partial"
        if os.path.lexists(partial):  # left by a crash: nothing can resume into it safely
            await asyncio.to_thread(shutil.rmtree, partial, True)
        job = _Job(
            job_id=uuid.uuid4().hex[:12],
            repo=repo,
            target=target_dir,
            source=source,
            on_event=on_event,
            partial=partial,
            final=final,
        )
        self._forget_old_jobs()
        self._jobs[job.job_id] = job
        self._emit(
            job,
            {
                "type": "download_started",
                "job_id": job.job_id,
                "repo": repo,
                "target_dir": target_dir,
            },
        )
        job.task = asyncio.create_task(self._run(job), name=f"download-{job.job_id}")
        return job.job_id

    def cancel(self, job_id: str) -> bool:
        """Stop a running download; its partial folder is removed. False if no such running job."""
        job = self._jobs.get(job_id)
        if job is None or job.state != "running":
            return False
        job.cancelled = True
        for proc in job.procs:
            _kill(proc)
        return True

    def jobs(self) -> list[dict[str, Any]]:
        """Every job of this process, oldest first, as `{job_id, repo, target_dir, state, ...}`."""
        return [
            {
                "job_id": j.job_id,
                "repo": j.repo,
                "target_dir": j.target,
                "state": j.state,
                "file": j.file,
                "done": j.done,
                "total": j.total,
                "path": j.path,
                "message": j.message,
            }
            for j in self._jobs.values()
        ]

    async def wait(self, job_id: str) -> dict[str, Any]:
        """Wait for a job to end and return its `jobs()` entry (tests, shutdown)."""
        job = self._jobs[job_id]
        if job.task is not None:
            await asyncio.shield(job.task)
        return next(j for j in self.jobs() if j["job_id"] == job_id)

    async def close(self) -> None:
        """Cancel every running job and wait until their partial folders are gone (shutdown)."""
        running = [j for j in self._jobs.values() if j.state == "running"]
        for job in running:
            self.cancel(job.job_id)
        await asyncio.gather(*(j.task for j in running if j.task is not None), return_exceptions=True)

    def _forget_old_jobs(self) -> None:
        finished = [j for j in self._jobs.values() if j.state != "running"]
        for job in finished[: max(0, len(finished) - self.KEEP_FINISHED)]:
            del self._jobs[job.job_id]

    # -- the job ---------------------------------------------------------------------------

    def _emit(self, job: _Job, event: dict[str, Any]) -> None:
        try:
            job.on_event(event)
        except Exception:  # a broken listener must not kill the download
            logger.exception("download event listener failed for job %s", job.job_id)

    def _log(self, job: _Job, message: str) -> None:
        self._emit(job, {"type": "log", "job_id": job.job_id, "message": message})

    async def _run(self, job: _Job) -> None:
        progress = _Progress(job, lambda ev: self._emit(job, ev))
        try:
            if isinstance(job.source, HfSource):
                await self._run_hf(job, job.source, progress)
            else:
                await self._run_git(job, job.source, progress)
            self._check_cancelled(job)
            await self._finish(job)
        except _Cancelled:
            job.state, job.message = "cancelled", "The download was cancelled."
        except DownloadError as exc:
            job.state, job.message = "failed", exc.message
        except asyncio.CancelledError:
            job.state, job.message = "cancelled", "The download was stopped (server shutting down)."
            for proc in job.procs:
                _kill(proc)
            await asyncio.to_thread(shutil.rmtree, job.partial, True)
            raise
        except Exception:
            logger.exception("download %s of %s failed", job.job_id, job.repo)
            job.state = "failed"
            job.message = "The download failed unexpectedly; the server log has details."
        finally:
            for proc in job.procs:
                _kill(proc)
        if job.state == "done":
            self._emit(job, {"type": "download_done", "job_id": job.job_id, "path": job.path})
            logger.info("download %s of %s finished: %s", job.job_id, job.repo, job.path)
            return
        await asyncio.to_thread(shutil.rmtree, job.partial, True)
        code = "cancelled" if job.state == "cancelled" else "download_failed"
        logger.info("download %s of %s %s: %s", job.job_id, job.repo, job.state, job.message)
        self._emit(job, {"type": "error", "code": code, "job_id": job.job_id, "message": job.message})

    def _check_cancelled(self, job: _Job) -> None:
        if job.cancelled:
            raise _Cancelled

    def _check_size(self, total: int) -> None:
        if self.max_bytes is not None and total > self.max_bytes:
            raise DownloadError(
                f"The download is {total / GiB:.2f} GiB, over the limit of {self.max_bytes / GiB:.2f} GiB."
            )
        free = _free_bytes(self.dirs.var_models_dir)
        if total + self.min_free_bytes > free:
            raise DownloadError(
                f"Not enough free disk: the download needs {total / GiB:.2f} GiB, {free / GiB:.2f} GiB "
                f"is free and {self.min_free_bytes / GiB:.1f} GiB must stay free."
            )

    async def _finish(self, job: _Job) -> None:
        """Check the result, make it safe, and move it into place in one rename."""
        removed = await asyncio.to_thread(_remove_escaping_symlinks, job.partial)
        for rel in removed:
            logger.warning("download %s: removed symlink %s pointing outside", job.job_id, rel)
            self._log(job, f"Removed the symlink {rel}: it pointed outside the model folder.")
        for leftover in (job.partial / PARTIAL_MARKER, job.partial / ".cache"):
            if leftover.is_dir():
                await asyncio.to_thread(shutil.rmtree, leftover, True)
            elif leftover.exists():
                leftover.unlink()
        if not await asyncio.to_thread(_contains_model, job.partial):
            raise DownloadError(
                "The download holds no GGUF file or Hugging Face model folder (config.json + *.safetensors)."
            )
        self._check_cancelled(job)
        if os.path.lexists(job.final):
            raise DownloadError(f"var/models/{job.target} appeared meanwhile; nothing was replaced.")
        os.rename(job.partial, job.final)
        inside = [e for e in self.dirs.scan() if e.path == job.final or job.final in e.path.parents]
        job.path = inside[0].rel_path if len(inside) == 1 else f"var/models/{job.target}"
        job.state = "done"

    # -- subprocess plumbing ---------------------------------------------------------------

    async def _spawn(
        self,
        job: _Job,
        argv: list[str],
        env: dict[str, str],
        cwd: Path | None = None,
        stdin: bool = False,
    ) -> asyncio.subprocess.Process:
        self._check_cancelled(job)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(cwd) if cwd else None,
            env=env,
            start_new_session=True,  # own process group: cancel kills git's helpers too
        )
        job.procs.append(proc)
        return proc

    async def _read_lines(self, stream: asyncio.StreamReader, on_line: Callable[[str], None]) -> None:
        """Split a child's output on newlines and carriage returns (git redraws progress with \\r)."""
        buffer = b""
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = re.split(rb"[\r\n]", buffer)
            for line in lines:
                if line.strip():
                    on_line(line.decode("utf-8", errors="replace"))
        if buffer.strip():
            on_line(buffer.decode("utf-8", errors="replace"))

    async def _poll(self, measure: Callable[[], tuple[int, int | None, str | None]], progress: _Progress) -> None:
        """Report bytes on disk every PROGRESS_INTERVAL until cancelled."""
        while True:
            figures = await asyncio.to_thread(measure)
            progress.update(*figures)
            await asyncio.sleep(PROGRESS_INTERVAL)

    # -- Hugging Face ----------------------------------------------------------------------

    async def _run_hf(self, job: _Job, src: HfSource, progress: _Progress) -> None:
        job.partial.mkdir(parents=True)
        (job.partial / PARTIAL_MARKER).touch()
        env = _child_env()
        argv = [
            sys.executable,
            "-m",
            "llmws_core.engine.download",
            "hf",
            src.repo_id,
            str(job.partial),
            "--revision",
            src.revision,
        ]
        if src.filename:
            argv += ["--filename", src.filename]
        if src.quant:
            argv += ["--quant", src.quant]
        proc = await self._spawn(job, argv, env, stdin=True)
        assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
        stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        stderr_task = asyncio.create_task(self._read_lines(proc.stderr, stderr_tail.append))
        poll_task: asyncio.Task[None] | None = None
        plan: dict[str, Any] | None = None
        result: dict[str, Any] | None = None
        failure: str | None = None
        self._log(job, f"Asking the Hugging Face Hub for {src.repo_id}.")
        try:
            async for raw in proc.stdout:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                kind = msg.get("event")
                if kind == "plan" and plan is None:
                    plan = msg
                    files: list[dict[str, Any]] = plan["files"]
                    total = int(plan["total"])
                    try:
                        self._check_size(total)
                    except DownloadError:
                        proc.stdin.write(b"stop\n")
                        raise
                    proc.stdin.write(b"go\n")
                    await proc.stdin.drain()
                    names = ", ".join(f["path"] for f in files[:5])
                    more = f" and {len(files) - 5} more" if len(files) > 5 else ""
                    self._log(
                        job,
                        f"Downloading {len(files)} file(s): {names}{more} ({total / 1e6:.1f} MB).",
                    )
                    poll_task = asyncio.create_task(
                        self._poll(functools.partial(_hf_measure, job.partial, files, total), progress)
                    )
                elif kind == "log":
                    self._log(job, str(msg.get("message", "")))
                elif kind == "done":
                    result = msg
                elif kind == "error":
                    failure = str(msg.get("message") or "The download failed.")
            rc = await proc.wait()
        finally:
            if poll_task is not None:
                poll_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll_task
            _kill(proc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stderr_task, 5)
        self._check_cancelled(job)
        if stderr_tail and (failure or rc != 0):
            logger.warning("hf download %s output:\n%s", job.job_id, "\n".join(stderr_tail))
        if failure:
            raise DownloadError(failure)
        if rc != 0 or result is None or plan is None:
            raise DownloadError("The download stopped unexpectedly; the server log has details.")
        total = int(plan["total"])
        await progress.finish(total, total, None)

    # -- git + git-lfs ---------------------------------------------------------------------

    async def _git(self, job: _Job, args: list[str], env: dict[str, str], cwd: Path | None, what: str) -> None:
        """Run one git command, relaying its progress lines as throttled `log` events."""
        proc = await self._spawn(job, ["git", *args], env, cwd)
        assert proc.stdout is not None and proc.stderr is not None
        tail: collections.deque[str] = collections.deque(maxlen=40)
        last_log = [0.0]

        def on_line(line: str) -> None:
            tail.append(line)
            now = time.monotonic()
            if _GIT_PROGRESS_RE.match(line.strip()) and (now - last_log[0] >= LOG_INTERVAL or "done" in line):
                last_log[0] = now
                self._log(job, line.strip().removeprefix("remote: ").strip()[:200])

        await asyncio.gather(self._read_lines(proc.stderr, on_line), self._read_lines(proc.stdout, tail.append))
        rc = await proc.wait()
        self._check_cancelled(job)
        if rc != 0:
            text = "\n".join(tail)
            logger.warning("git %s for download %s failed (%d):\n%s", what, job.job_id, rc, text)
            raise DownloadError(_git_failure(what, text))

    async def _run_git(self, job: _Job, src: GitSource, progress: _Progress) -> None:
        env = _child_env()
        env["GIT_ALLOW_PROTOCOL"] = GIT_PROTOCOLS
        env["GIT_TERMINAL_PROMPT"] = "0"  # no hanging on a password prompt nobody can answer
        env["GIT_LFS_SKIP_SMUDGE"] = "1"  # fetch LFS objects in our own step, with progress
        self._log(job, "Cloning the repository.")
        await self._git(
            job,
            ["clone", "--progress", "--depth", "1", "--", src.url, str(job.partial)],
            env,
            None,
            "clone",
        )
        (job.partial / PARTIAL_MARKER).touch()
        pointers = await asyncio.to_thread(_lfs_pointers, job.partial)
        if pointers:
            total = sum(size for _, size in pointers)
            self._check_size(total)
            if shutil.which("git-lfs") is None:
                raise DownloadError("The repository stores files in git-lfs, which is not installed on the server.")
            self._log(job, f"Fetching {len(pointers)} LFS file(s) ({total / 1e6:.1f} MB).")
            lfs_dir = job.partial / ".git" / "lfs"
            label = pointers[0][0] if len(pointers) == 1 else f"{len(pointers)} LFS files"

            def measure() -> tuple[int, int | None, str | None]:
                done = sum(_tree_bytes(lfs_dir / d) for d in ("objects", "incomplete", "tmp") if (lfs_dir / d).is_dir())
                return done, total, label

            poll_task = asyncio.create_task(self._poll(measure, progress))
            try:
                env.pop("GIT_LFS_SKIP_SMUDGE")
                await self._git(job, ["lfs", "pull"], env, job.partial, "lfs pull")
            finally:
                poll_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll_task
            missing = await asyncio.to_thread(_lfs_pointers, job.partial)
            if missing:
                raise DownloadError(f"{len(missing)} LFS file(s) could not be fetched from the remote.")
            await progress.finish(total, total, label)
        else:
            self._log(job, "The repository has no LFS files.")
        await asyncio.to_thread(shutil.rmtree, job.partial / ".git")


def _git_failure(what: str, text: str) -> str:
    """A user-safe sentence for a failed git step (git's own text may hold paths or hosts)."""
    low = text.lower()
    if "could not read username" in low or "authentication failed" in low or "permission denied" in low:
        return "The repository needs credentials the server does not have."
    if "not found" in low or "does not appear to be a git repository" in low or "does not exist" in low:
        return "The repository was not found or is not reachable."
    if "could not resolve host" in low or "unable to access" in low or "connection" in low:
        return "The repository's host could not be reached."
    if "transport" in low and "not allowed" in low:
        return "That kind of git URL is not allowed."
    return f"git {what} failed; the server log has details."


def _child_env() -> dict[str, str]:
    """The environment of download children: ours, plus our package importable and quiet tqdm."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    return env


def _hf_measure(partial: Path, files: list[dict[str, Any]], total: int) -> tuple[int, int, str | None]:
    """Bytes on disk so far, and the first planned file not yet complete."""
    done = _tree_bytes(partial)
    current = None
    for f in files:
        path = partial / f["path"]
        try:
            complete = path.stat().st_size >= int(f["size"] or 0)
        except OSError:
            complete = False
        if not complete:
            current = f["path"]
            break
    return done, total, current


# -- the huggingface_hub worker (runs in a child process) --------------------------------------


def _say(**message: Any) -> None:
    """One JSON line to the parent (stdout is the worker's channel, not a console)."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


#: Bytes huggingface_hub writes at a time in the worker (its default, 10 MiB, makes progress coarse).
WORKER_CHUNK_SIZE = 1024 * 1024


def _finer_chunks() -> None:
    """Make huggingface_hub write to disk every MiB, so the parent sees bytes arrive.

    The parent measures progress on disk, and huggingface_hub buffers a whole
    `DOWNLOAD_CHUNK_SIZE` before each write. Older releases copied the constant into
    `file_download`, newer ones read `constants` at call time: set both.
    """
    from huggingface_hub import constants, file_download

    constants.DOWNLOAD_CHUNK_SIZE = WORKER_CHUNK_SIZE
    if hasattr(file_download, "DOWNLOAD_CHUNK_SIZE"):
        file_download.DOWNLOAD_CHUNK_SIZE = WORKER_CHUNK_SIZE


def _hf_worker(repo_id: str, dest: str, revision: str, filename: str | None, quant: str | None = None) -> int:
    """Plan, wait for the parent's go, download with `snapshot_download`, verify sizes."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.hf_api import RepoFile
        from huggingface_hub.utils import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        _say(event="error", message="huggingface_hub is not installed on the server.")
        return 1
    if constants.HF_HUB_OFFLINE:
        _say(event="error", message="Downloads are off: HF_HUB_OFFLINE is set on the server.")
        return 1
    try:
        api = HfApi()
        commit = api.model_info(repo_id, revision=revision).sha or revision
        sizes = {
            f.path: int(f.size or 0)
            for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
            if isinstance(f, RepoFile)
        }
        chosen = choose_hf_files(sizes, filename, quant)
        plan = [{"path": p, "size": sizes[p]} for p in chosen]
        _say(event="plan", files=plan, total=sum(sizes[p] for p in chosen), commit=commit)
        if sys.stdin.readline().strip() != "go":
            return 3
        _finer_chunks()
        snapshot_download(
            repo_id,
            revision=commit,
            local_dir=dest,
            allow_patterns=[glob.escape(p) for p in chosen],
            max_workers=4,
        )
        for p in chosen:
            actual = (Path(dest) / p).stat().st_size
            if actual != sizes[p]:
                _say(event="error", message=f"'{p}' arrived with the wrong size; try again.")
                return 1
        _say(event="done", commit=commit)
        return 0
    except DownloadError as exc:
        _say(event="error", message=exc.message)
    except (RepositoryNotFoundError, GatedRepoError):
        _say(
            event="error",
            message=f"The repository '{repo_id}' was not found on the Hub, or it is private or gated.",
        )
    except RevisionNotFoundError:
        _say(event="error", message=f"The repository has no revision '{revision}'.")
    except EntryNotFoundError:
        _say(event="error", message="A file of the repository is missing on the Hub.")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        logger.warning("hub download failed: %r", exc)
        _say(
            event="error",
            message="The Hugging Face Hub could not be reached or refused the download.",
        )
    except Exception as exc:
        logger.exception("hub download failed: %r", exc)
        _say(event="error", message="The download failed; the server log has details.")
    return 1


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmws_core.engine.download")
    sub = parser.add_subparsers(dest="cmd", required=True)
    hf = sub.add_parser("hf", help="download a Hugging Face repo into a folder (used by LLMWS)")
    hf.add_argument("repo_id")
    hf.add_argument("dest")
    hf.add_argument("--revision", default="main")
    hf.add_argument("--filename")
    hf.add_argument("--quant")
    args = parser.parse_args(argv)
    return _hf_worker(args.repo_id, args.dest, args.revision, args.filename, args.quant)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
