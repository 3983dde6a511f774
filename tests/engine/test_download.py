"""Model downloads for real, without the internet: huggingface_hub against a local fake Hub,
git + git-lfs from a local repository through a file:// remote."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmws_core.engine.download import (
    DownloadManager,
    GitSource,
    HfSource,
    choose_hf_files,
    parse_source,
)
from llmws_core.engine.scan import ModelDirs
from llmws_core.errors import BadRequest, Busy, DownloadError, Forbidden
from tests.engine.fake_hub import FakeHub, FakeRepo, tiny_gguf, tiny_hf_files

TIMEOUT_SCALE = float(os.environ.get("LLMWS_TEST_TIMEOUT_SCALE", "1"))


class Recorder:
    """Collects events with their arrival time and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.loop_thread_ok = True
        self._changed = asyncio.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.loop_thread_ok = False
        self.events.append(event)
        self.times.append(time.monotonic())
        self._changed.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def wait_for(self, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout * TIMEOUT_SCALE
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"event not seen; got {self.events}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass


@pytest.fixture
def dirs(tmp_path: Path) -> ModelDirs:
    (tmp_path / "models").mkdir()
    return ModelDirs(tmp_path / "models", tmp_path / "var" / "models")


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A private HF_HOME and network allowed (the fake hub is the network)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield


def _serve(monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)


def _leftovers(dirs: ModelDirs) -> list[str]:
    folder = dirs.var_models_dir
    return sorted(os.listdir(folder)) if folder.exists() else []


# -- where a repo string leads -----------------------------------------------------------------


def test_parse_source_tells_hub_repos_from_git_urls() -> None:
    """Repo ids and huggingface.co URLs go to the Hub; other git URLs go to git."""
    assert parse_source("org/name") == HfSource("org/name")
    assert parse_source("https://huggingface.co/org/name") == HfSource("org/name")
    assert parse_source("https://huggingface.co/org/name/resolve/main/x.Q4_0.gguf") == HfSource(
        "org/name", "main", "x.Q4_0.gguf"
    )
    assert parse_source("https://huggingface.co/org/name/tree/v2") == HfSource("org/name", "v2")
    assert parse_source("file:///srv/models/x.git") == GitSource("file:///srv/models/x.git")
    assert parse_source("https://gitlab.com/a/b.git") == GitSource("https://gitlab.com/a/b.git")
    assert parse_source("git@github.com:a/b.git") == GitSource("git@github.com:a/b.git")


@pytest.mark.parametrize(
    "repo",
    [
        "",
        "-uhttps://x",
        "ext::sh -c touch% /tmp/pwned",
        "a b",
        "https://huggingface.co/datasets/x/y",
        "../x",
    ],
)
def test_parse_source_refuses_nonsense_and_dangerous_urls(repo: str) -> None:
    """Option-looking strings, git's ext:: transport and non-model Hub URLs are refused."""
    with pytest.raises(BadRequest):
        parse_source(repo)


def test_choose_hf_files_takes_one_q4_gguf_or_the_model_folder() -> None:
    """A GGUF repo yields one Q4 file (Q4_K_M first); a safetensors repo its weights and configs."""
    ggufs = {
        "m.Q8_0.gguf": 9,
        "m.Q4_0.gguf": 4,
        "m.Q4_K_M.gguf": 5,
        "mmproj-m.gguf": 1,
        "README.md": 1,
    }
    assert choose_hf_files(ggufs, None) == ["m.Q4_K_M.gguf"]
    assert choose_hf_files({"m.Q8_0.gguf": 9, "m.Q4_0.gguf": 4}, None) == ["m.Q4_0.gguf"]
    assert choose_hf_files(ggufs, "m.Q8_0.gguf") == ["m.Q8_0.gguf"]
    split = {"m-00001-of-00002.gguf": 1, "m-00002-of-00002.gguf": 1}
    assert choose_hf_files(split, None) == list(split)
    folder = {
        "config.json": 1,
        "model.safetensors": 1,
        "tokenizer.json": 1,
        "pytorch_model.bin": 1,
        "original/consolidated.safetensors": 1,
    }
    assert choose_hf_files(folder, None) == ["config.json", "model.safetensors", "tokenizer.json"]
    with pytest.raises(DownloadError):
        choose_hf_files({"README.md": 1}, None)
    with pytest.raises(DownloadError):
        choose_hf_files(ggufs, "nope.gguf")


def test_choose_hf_files_by_quantization_tag() -> None:
    """A quantization tag (Ollama's hf.co/org/repo:Q8_0) picks that GGUF, whole words only, any case."""
    ggufs = {"m.Q8_0.gguf": 9, "m.Q4_K_M.gguf": 5, "m.Q4_K_S.gguf": 5, "m-IQ4_XS.gguf": 4}
    assert choose_hf_files(ggufs, None, "Q8_0") == ["m.Q8_0.gguf"]
    assert choose_hf_files(ggufs, None, "q4_k_m") == ["m.Q4_K_M.gguf"]
    with pytest.raises(DownloadError):
        choose_hf_files(ggufs, None, "Q4_K")  # a prefix of Q4_K_M / Q4_K_S is no match
    assert choose_hf_files(ggufs, None, "IQ4_XS") == ["m-IQ4_XS.gguf"]
    with pytest.raises(DownloadError):
        choose_hf_files(ggufs, None, "Q5_K_M")
    assert parse_source("acme/m-GGUF", quant="Q8_0").quant == "Q8_0"  # type: ignore[union-attr]
    with pytest.raises(BadRequest):
        parse_source("acme/m-GGUF", quant="latest; rm -rf")


# -- refusals before anything starts -----------------------------------------------------------


async def test_target_escaping_var_models_is_forbidden(dirs: ModelDirs) -> None:
    """A target_dir of ../evil is refused as forbidden and nothing is created."""
    manager = DownloadManager(dirs, min_free_bytes=0)
    for target in ("../evil", "a/b", ".hidden", ".."):
        with pytest.raises(Forbidden):
            await manager.start("org/name", target, lambda e: None)
    assert not (dirs.var_models_dir.parent / "evil").exists()
    assert manager.jobs() == []


async def test_file_urls_can_be_turned_off(dirs: ModelDirs, tmp_path: Path) -> None:
    """A server configured without file:// downloads refuses them as forbidden."""
    manager = DownloadManager(dirs, min_free_bytes=0, allow_file_urls=False)
    with pytest.raises(Forbidden):
        await manager.start((tmp_path / "x.git").as_uri(), "x", lambda e: None)


async def test_refuses_when_disk_is_nearly_full(dirs: ModelDirs) -> None:
    """With less free disk than the configured reserve, a download is refused up front."""
    manager = DownloadManager(dirs, min_free_bytes=1 << 60)
    with pytest.raises(DownloadError, match="free disk"):
        await manager.start("org/name", "x", lambda e: None)


async def test_refuses_an_existing_target(dirs: ModelDirs) -> None:
    """A download never overwrites a model that is already there."""
    (dirs.var_models_dir / "x").mkdir(parents=True)
    with pytest.raises(DownloadError, match="exists"):
        await DownloadManager(dirs, min_free_bytes=0).start("org/name", "x", lambda e: None)


# -- huggingface_hub against the fake Hub --------------------------------------------------------


async def test_hub_download_ends_in_a_usable_model_folder(
    dirs: ModelDirs, hf_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub repo downloads into var/models/<target> with started, progress and done events."""
    files = tiny_hf_files(n_weights=600_000)  # ~2.4 MB of weights
    with FakeHub([FakeRepo("org/tiny", files)], chunk_delay=0.04) as hub:
        _serve(monkeypatch, hub)
        rec = Recorder()
        manager = DownloadManager(dirs, min_free_bytes=0)
        job_id = await manager.start("org/tiny", "tiny", rec)
        done = await rec.wait_for(lambda e: e["type"] in ("download_done", "error"))

    assert done == {"type": "download_done", "job_id": job_id, "path": "var/models/tiny"}, rec.events
    assert rec.events[0] == {
        "type": "download_started",
        "job_id": job_id,
        "repo": "org/tiny",
        "target_dir": "tiny",
    }
    assert rec.loop_thread_ok
    folder = dirs.var_models_dir / "tiny"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == files[name]
    assert not (folder / "README.md").exists()  # only what a model folder needs
    assert not (folder / ".cache").exists() and not (folder / ".partial").exists()
    listed = dirs.resolve("tiny")
    assert (listed.format, listed.parameters) == ("safetensors", 600_000)
    assert _leftovers(dirs) == ["tiny"]

    progress = rec.of("download_progress")
    total = sum(len(files[n]) for n in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"))
    assert len(progress) >= 2
    assert all(p["total"] == total and 0 <= p["done"] <= total for p in progress)
    assert progress[-1]["done"] == total
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert any(0 < p["done"] < total for p in progress)
    assert any(p["rate"] > 0 for p in progress)
    times = [t for t, e in zip(rec.times, rec.events, strict=True) if e["type"] == "download_progress"]
    assert all(b - a >= 0.2 for a, b in zip(times, times[1:], strict=False))  # at most ~4/s
    assert manager.jobs()[0]["state"] == "done"


async def test_hub_gguf_repo_downloads_one_gguf(dirs: ModelDirs, hf_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a repo of several GGUF files only the Q4 one (or the one named) is fetched."""
    repo = FakeRepo(
        "org/tiny-gguf",
        {
            "tiny.Q4_K_M.gguf": tiny_gguf(padding=50_000),
            "tiny.Q8_0.gguf": tiny_gguf(padding=90_000),
            "README.md": b"hi",
        },
    )
    with FakeHub([repo]) as hub:
        _serve(monkeypatch, hub)
        manager = DownloadManager(dirs, min_free_bytes=0)
        rec = Recorder()
        await manager.start(f"{hub.url}/org/tiny-gguf", "auto", rec)
        done = await rec.wait_for(lambda e: e["type"] in ("download_done", "error"))
        assert done["type"] == "download_done", rec.events
        assert done["path"] == "var/models/auto/tiny.Q4_K_M.gguf"
        assert sorted(os.listdir(dirs.var_models_dir / "auto")) == ["tiny.Q4_K_M.gguf"]

        rec2 = Recorder()
        await manager.start("org/tiny-gguf", "named", rec2, filename="tiny.Q8_0.gguf")
        done2 = await rec2.wait_for(lambda e: e["type"] in ("download_done", "error"))
        assert done2["type"] == "download_done", rec2.events
        assert os.listdir(dirs.var_models_dir / "named") == ["tiny.Q8_0.gguf"]
        assert ("GET", "/org/tiny-gguf/resolve/main/README.md") not in hub.requests
    assert dirs.resolve("named/tiny.Q8_0.gguf").quantization == "Q4_K_M"  # from the header


async def test_hub_unknown_repo_fails_cleanly(dirs: ModelDirs, hf_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo the Hub does not have ends in a download_failed error and leaves nothing behind."""
    with FakeHub([]) as hub:
        _serve(monkeypatch, hub)
        rec = Recorder()
        job_id = await DownloadManager(dirs, min_free_bytes=0).start("org/ghost", "ghost", rec)
        err = await rec.wait_for(lambda e: e["type"] in ("download_done", "error"))
    assert err["type"] == "error" and err["code"] == "download_failed" and err["job_id"] == job_id
    assert "not found" in err["message"]
    assert "Traceback" not in err["message"] and "http" not in err["message"]
    assert _leftovers(dirs) == []


async def test_cancel_mid_download_leaves_nothing(
    dirs: ModelDirs, hf_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling a running download stops it, reports `cancelled`, and no partial model remains."""
    files = tiny_hf_files(n_weights=2_000_000)  # 8 MB, ~6 s at this pace
    with FakeHub([FakeRepo("org/big", files)], chunk_delay=0.05) as hub:
        _serve(monkeypatch, hub)
        rec = Recorder()
        manager = DownloadManager(dirs, min_free_bytes=0)
        job_id = await manager.start("org/big", "big", rec)
        await rec.wait_for(lambda e: e["type"] == "download_progress" and e["done"] > 100_000)
        assert dirs.scan() == []  # while downloading, nothing is listed
        assert _leftovers(dirs) == [".big.partial"]
        assert manager.cancel(job_id) is True
        err = await rec.wait_for(lambda e: e["type"] in ("download_done", "error"), timeout=15)
        await manager.wait(job_id)
    assert err["code"] == "cancelled" and err["job_id"] == job_id
    assert _leftovers(dirs) == []
    assert dirs.scan() == []
    assert manager.jobs()[0]["state"] == "cancelled"
    assert manager.cancel(job_id) is False


async def test_concurrent_downloads_are_limited(dirs: ModelDirs, hf_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past max_concurrent running downloads, another one is refused as busy."""
    with FakeHub([FakeRepo("org/big", tiny_hf_files(n_weights=2_000_000))], chunk_delay=0.05) as hub:
        _serve(monkeypatch, hub)
        manager = DownloadManager(dirs, max_concurrent=1, min_free_bytes=0)
        job_id = await manager.start("org/big", "one", lambda e: None)
        with pytest.raises(Busy):
            await manager.start("org/big", "two", lambda e: None)
        await manager.close()
    assert manager.jobs()[0]["job_id"] == job_id and manager.jobs()[0]["state"] == "cancelled"
    assert _leftovers(dirs) == []


# -- git + git-lfs through a file:// remote ------------------------------------------------------


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "-c",
            "init.defaultBranch=main",
            *args,
        ],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def lfs_remote(tmp_path: Path) -> tuple[str, bytes]:
    """A bare repo holding a GGUF model as an LFS object, reachable as a file:// URL."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if subprocess.run(["git", "lfs", "version"], capture_output=True).returncode != 0:
        pytest.skip("git-lfs is not installed and `make setup` could not apt-get install it")
    bare = tmp_path / "remote" / "model.git"
    bare.mkdir(parents=True)
    _git("init", "-q", "--bare", "-b", "main", str(bare), cwd=tmp_path)
    work = tmp_path / "work"
    _git("clone", "-q", bare.as_uri(), str(work), cwd=tmp_path)
    _git("lfs", "install", "--local", cwd=work)
    _git("lfs", "track", "*.gguf", cwd=work)
    weights = tiny_gguf(padding=1_500_000)
    (work / "model.Q4_K_M.gguf").write_bytes(weights)
    (work / "README.md").write_text("a model\n")
    os.symlink("/etc/passwd", work / "escape")
    os.symlink("../../outside", work / "up")
    os.symlink("README.md", work / "readme-link")
    _git("add", "-A", cwd=work)
    _git("commit", "-q", "-m", "model", cwd=work)
    _git("push", "-q", "origin", "HEAD:main", cwd=work)
    return bare.as_uri(), weights


async def test_git_lfs_download_from_a_file_remote(dirs: ModelDirs, lfs_remote: tuple[str, bytes]) -> None:
    """A git repo with an LFS model downloads with progress, without .git, and symlinks out are removed."""
    url, weights = lfs_remote
    rec = Recorder()
    manager = DownloadManager(dirs, min_free_bytes=0)
    job_id = await manager.start(url, "from-git", rec)
    done = await rec.wait_for(lambda e: e["type"] in ("download_done", "error"))

    assert done == {
        "type": "download_done",
        "job_id": job_id,
        "path": "var/models/from-git/model.Q4_K_M.gguf",
    }, rec.events
    folder = dirs.var_models_dir / "from-git"
    assert (folder / "model.Q4_K_M.gguf").read_bytes() == weights  # the object, not the pointer
    assert not (folder / ".git").exists() and not (folder / ".partial").exists()
    assert not os.path.lexists(folder / "escape") and not os.path.lexists(folder / "up")
    assert os.readlink(folder / "readme-link") == "README.md"  # a link inside stays
    logs = " ".join(e["message"] for e in rec.of("log"))
    assert "escape" in logs and "up" in logs
    progress = rec.of("download_progress")
    assert progress and progress[-1]["done"] == progress[-1]["total"] == len(weights)
    assert dirs.resolve("from-git/model.Q4_K_M.gguf").parameters == 2 * 256 * 1000
    assert _leftovers(dirs) == ["from-git"]


async def test_git_download_of_a_missing_repo_fails_cleanly(dirs: ModelDirs, tmp_path: Path) -> None:
    """A git URL that leads nowhere ends in download_failed with a plain message and no leftovers."""
    rec = Recorder()
    await DownloadManager(dirs, min_free_bytes=0).start((tmp_path / "nope.git").as_uri(), "nope", rec)
    err = await rec.wait_for(lambda e: e["type"] in ("download_done", "error"))
    assert err["code"] == "download_failed" and "not found" in err["message"]
    assert str(tmp_path) not in err["message"]
    assert _leftovers(dirs) == []
