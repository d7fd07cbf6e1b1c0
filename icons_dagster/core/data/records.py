"""Loading and validating LLaVA-format records (the candidate pool and benchmark splits).

A pool or a benchmark split is one file: a JSON list (``.json``) or JSON Lines
(``.jsonl``) of records like::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"},
                       {"from": "gpt", "value": "The ..."}],
     "subtask": "...",  # optional
     ...}               # other keys are kept verbatim in ``Record.raw_json``

Why validate up front: gradient extraction runs for hours on a GPU; a record that
breaks the collator (no answer, a stray ``<image>``, a missing image file) should be
found in minutes on a CPU, reported with its reason, and skipped -- never dropped
silently (``len(records) + len(problems)`` is the number of entries in the file).

Validation never decodes images: it only checks the path stays inside the image
root and (with ``check_images``) that the file exists via one ``os.lstat``.
``load_image`` decodes later, when the pixels are actually needed.

Expected speed: one ``json.loads`` for the whole file (or one per JSONL line),
``str.count`` for placeholders, one ``realpath`` per distinct image directory
(cached), one ``lstat`` per image, and the cyclic GC paused while loading.
Measured on a 2-core VM, warm page cache: a synthetic 100K-record, 88 MB file
(7/8 image records over 10 files) validates in ~2.7 s, of which ~1.2 s is
``json.loads``; LLaVA-665K (~1 GB) should take well under a minute.  On cold
network storage the per-image ``lstat`` dominates.

Numbering: ``index`` is the 0-based position of the record in the file (for JSONL,
among non-blank lines); turns and file lines are numbered from 1 in messages.

This module must not import dagster.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icons_dagster.core.config import DEFAULT_MAX_IMAGE_PIXELS

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as _PILImage

__all__ = [
    "ImageLoadError",
    "ImageRoot",
    "LoadedRecords",
    "Record",
    "RecordFileError",
    "RecordProblem",
    "Turn",
    "benchmark_image_root",
    "find_benchmarks",
    "load_image",
    "load_records",
    "resolve_image_path",
    "split_file",
]

IMAGE_TOKEN = "<image>"
HUMAN = "human"
GPT = "gpt"
_ROLES = (HUMAN, GPT)
_SUBTASK_MODES = ("forbid-mixed", "ignore")
_MIXED_IDS_SHOWN = 5
# One encoder for every record: same output as json.dumps(rec, ensure_ascii=False,
# separators=(",", ":")) without building an encoder per call (665K calls).
_RAW_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)


class RecordFileError(ValueError):
    """Whole-file problem (unreadable, malformed JSON list, top level not a list).

    Raised instead of per-record problems because nothing in the file can be trusted.
    The message names the file (and line/position when known).
    """


class ImageLoadError(ValueError):
    """An image file could not be decoded; the message names the path and the cause."""


@dataclass(frozen=True, slots=True)
class Turn:
    """One conversation turn; ``role`` is normalised to "human" or "gpt"."""

    role: str
    text: str


@dataclass(frozen=True, slots=True)
class Record:
    """A validated record; ``raw_json`` keeps the original dict untouched for re-export."""

    id: str
    image: str | None  # the path string as written in the file
    image_path: Path | None  # resolved absolute path, confined to the image root
    turns: tuple[Turn, ...]
    subtask: str | None
    raw_json: str  # json.dumps(original, ensure_ascii=False, separators=(",", ":"))
    index: int  # 0-based position in the file


@dataclass(frozen=True, slots=True)
class RecordProblem:
    """Why one entry of a file was skipped (so nothing is lost silently)."""

    file: str
    index: int
    record_id: str | None
    reason: str

    def __str__(self) -> str:
        who = f"id '{self.record_id}'" if self.record_id is not None else "no id"
        return f"{self.file}: record #{self.index} ({who}): {self.reason}"


@dataclass(frozen=True, slots=True)
class LoadedRecords:
    """Result of ``load_records``: valid records, skipped ones, and the file's hash."""

    path: Path
    records: tuple[Record, ...]  # valid records, in file order
    problems: tuple[RecordProblem, ...]  # every skipped record, with its reason
    content_sha256: str  # sha256 of the file bytes

    @property
    def n_entries(self) -> int:
        """Entries in the file (valid + skipped)."""
        return len(self.records) + len(self.problems)


# --------------------------------------------------------------------------- images


class _Invalid(Exception):
    """Internal: a record fails validation; ``args[0]`` is the reason."""


class _ImageResolver:
    """Confines image paths to one root, cheaply.

    The root is resolved once.  A relative path is checked lexically (no absolute
    paths, no ``..`` components); its parent directory is then ``realpath``-ed once
    per distinct directory (cached) to catch directory symlinks that lead outside.
    A symlinked *file* is only seen when the file is stat-ed (``check_file``).
    """

    def __init__(self, image_root: str | os.PathLike[str]) -> None:
        self.root = os.path.realpath(os.fspath(image_root))
        self._prefix = self.root if self.root.endswith(os.sep) else self.root + os.sep
        self._parents: dict[str, str | None] = {}  # lexical parent -> real parent | None (escapes)

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self._prefix)

    def resolve(self, relative: str) -> str:
        """Return the absolute path (real parent directory + file name); raise _Invalid."""
        if relative == "":
            raise _Invalid("image path is empty")
        if "\x00" in relative:
            raise _Invalid("image path contains a NUL byte")
        if os.path.isabs(relative):
            raise _Invalid(f"image path escapes the image root: {relative!r} is absolute")
        # Reject any ".." (even "a/../b"): lexical normalisation of ".." is wrong when
        # "a" is a symlink, and real dataset paths never need it.
        parts = relative.replace("\\", "/").split("/")
        if ".." in parts:
            raise _Invalid(f"image path escapes the image root: {relative!r} contains '..'")
        joined = os.path.normpath(os.path.join(self.root, relative))
        if not joined.startswith(self._prefix):
            raise _Invalid(f"image path {relative!r} does not name a file inside the image root")
        parent, name = os.path.split(joined)
        real_parent = self._parents.get(parent, "")
        if real_parent == "":
            if parent == self.root:
                real_parent = self.root
            else:
                rp = os.path.realpath(parent)
                real_parent = rp if self._inside(rp) else None
            self._parents[parent] = real_parent
        if real_parent is None:
            raise _Invalid(
                f"image path escapes the image root: {relative!r} "
                f"(a directory symlink resolves to {os.path.realpath(parent)})"
            )
        return os.path.join(real_parent, name)

    def follow_link(self, path: str, relative: str) -> str:
        """``path`` is a symlink: return its confined target or raise _Invalid."""
        real = os.path.realpath(path)
        if not self._inside(real) or real == self.root:
            raise _Invalid(
                f"image path escapes the image root: {relative!r} is a symlink to {real}"
            )
        return real

    def check_file(self, path: str, relative: str) -> str:
        """Stat the file (no decode); follow a confined symlink; return the final path."""
        st = _stat_image(path, os.lstat)
        if stat.S_ISLNK(st.st_mode):
            path = self.follow_link(path, relative)
            st = _stat_image(path, os.stat)
        if not stat.S_ISREG(st.st_mode):
            raise _Invalid(f"image path is not a regular file: {path}")
        return path


def _stat_image(path: str, stat_fn) -> os.stat_result:
    """``stat_fn(path)`` with a missing or unreadable file turned into a record problem."""
    try:
        return stat_fn(path)
    except FileNotFoundError:
        raise _Invalid(f"image file not found: {path}") from None
    except OSError as e:
        raise _Invalid(f"image file not accessible: {path} ({e.strerror or e})") from None


class ImageRoot:
    """One image root, resolved once, for readers of stored relative image paths (the pool
    manifest): each path is confined to the root exactly as ``load_records`` confines it."""

    def __init__(self, image_root: str | os.PathLike[str]) -> None:
        self._resolver = _ImageResolver(image_root)
        self.path = Path(self._resolver.root)

    def locate(self, relative: str) -> Path:
        """The regular file ``relative`` names inside the root (a confined symlink followed);
        ValueError with the reason when it escapes the root or is not there."""
        try:
            return Path(self._resolver.check_file(self._resolver.resolve(relative), relative))
        except _Invalid as e:
            raise ValueError(e.args[0]) from None


def resolve_image_path(image_root: Path, relative: str) -> Path:
    """Resolve ``relative`` under ``image_root``; raise ValueError if it escapes the root.

    Escapes are absolute paths, ``..`` components, and symlinks (directory or file)
    resolving outside the root.  The file need not exist.
    """
    if not isinstance(relative, str):
        raise ValueError(f"image path must be a string, got {type(relative).__name__}")
    resolver = _ImageResolver(image_root)
    try:
        path = resolver.resolve(relative)
        if os.path.islink(path):
            path = resolver.follow_link(path, relative)
    except _Invalid as e:
        raise ValueError(f"{e.args[0]} (image root {resolver.root})") from None
    return Path(path)


def load_image(path: Path) -> "_PILImage.Image":
    """Decode an image fully and convert it to RGB (what the vision tower expects).

    Any decoding failure becomes ``ImageLoadError`` naming the path and the cause, so
    one bad file in a 665K pool is reported instead of crashing a worker obscurely.
    Records reach here screened (``screen_images``: the pixel limit); PIL's own bomb check
    stays as the last guard.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise ImageLoadError(f"cannot load image {path}: {type(e).__name__}: {e}") from e


def image_problem(path: Path, max_pixels: int, decode: bool = False) -> str | None:
    """Why the image cannot be used, or None. The header always (format, size against
    ``max_pixels``, before any pixel is decoded); with ``decode`` every pixel and the RGB
    conversion the run does."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(path) as im:
                width, height = im.size
                if width * height > max_pixels:
                    return f"image {path}: {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} (data.max_image_pixels)"
                if decode:
                    im.load()
                    im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        return f"cannot load image {path}: {type(e).__name__}: {e}"
    return None


def _decode_problem(args: tuple[str, int]) -> str | None:
    return image_problem(Path(args[0]), args[1], decode=True)


def screen_images(
    loaded: LoadedRecords,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    *,
    decode: bool = False,
    workers: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> LoadedRecords:
    """``loaded`` with every record whose image fails ``image_problem`` moved to its problems
    (file, record, id, reason). Headers are read by threads; ``decode`` (what ``validate``
    does) decodes every image in ``workers`` processes. ``progress(done, total)``."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    with_images = [r for r in loaded.records if r.image_path is not None]
    if not with_images:
        return loaded
    jobs = [(str(r.image_path), max_pixels) for r in with_images]
    chunk = max(1, min(256, len(jobs) // (4 * max(1, workers))))
    if decode and workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            found = _collect(pool.map(_decode_problem, jobs, chunksize=chunk), len(jobs), progress)
    elif decode:
        found = _collect(map(_decode_problem, jobs), len(jobs), progress)
    else:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            found = _collect(pool.map(lambda job: image_problem(Path(job[0]), job[1]), jobs), len(jobs), progress)
    bad = {r.index: reason for r, reason in zip(with_images, found) if reason is not None}
    if not bad:
        return loaded
    problems = [*loaded.problems, *(RecordProblem(str(loaded.path), r.index, r.id, bad[r.index]) for r in loaded.records if r.index in bad)]
    problems.sort(key=lambda problem: problem.index)
    return LoadedRecords(loaded.path, tuple(r for r in loaded.records if r.index not in bad), tuple(problems), loaded.content_sha256)


def _collect(results, total: int, progress: Callable[[int, int], None] | None) -> list[str | None]:
    found = []
    for done, reason in enumerate(results, start=1):
        found.append(reason)
        if progress is not None and (done == total or done % 256 == 0):
            progress(done, total)
    return found


# --------------------------------------------------------------------------- benchmarks


def split_file(benchmark_dir: Path, split: str) -> Path | None:
    """``<dir>/<split>.json``, else ``<dir>/<split>.jsonl``, else None."""
    benchmark_dir = Path(benchmark_dir)
    for ext in (".json", ".jsonl"):
        candidate = benchmark_dir / f"{split}{ext}"
        if candidate.is_file():
            return candidate
    return None


def find_benchmarks(benchmarks_dir: str | Path) -> dict[str, Path]:
    """Map each sub-folder name to its val file, sorted by name.

    Sub-folders without ``val.json``/``val.jsonl`` are ignored (they may hold other
    material); a missing ``benchmarks_dir`` is an error because it is a config mistake.
    """
    root = Path(benchmarks_dir)
    if not root.exists():
        raise FileNotFoundError(f"benchmarks directory not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"benchmarks path is not a directory: {root}")
    found: dict[str, Path] = {}
    for sub in sorted(root.iterdir(), key=lambda p: p.name):
        if not sub.is_dir():
            continue
        val = split_file(sub, "val")
        if val is not None:
            found[sub.name] = val
    return found


def benchmark_image_root(benchmark_dir: Path, default_root: Path | None) -> Path | None:
    """``<benchmark_dir>/images`` if it is a directory (self-contained benchmark), else the default."""
    images = Path(benchmark_dir) / "images"
    return images if images.is_dir() else default_root


# --------------------------------------------------------------------------- loading


def _read_entries(path: Path) -> tuple[list[tuple[int, Any, str | None]], str]:
    """Read the file; return ``[(index, value, parse_error)]`` and the sha256 of its bytes.

    ``.json`` problems are whole-file errors; a malformed ``.jsonl`` line becomes an
    entry with ``parse_error`` set so the other lines still load.
    """
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise RecordFileError(f"{path}: unsupported file extension {path.suffix!r} (expected .json or .jsonl)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecordFileError(f"{path}: cannot read file: {e.strerror or e}") from e
    digest = hashlib.sha256(data).hexdigest()

    def decode(chunk: bytes, first_line: int) -> str:
        try:
            return chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            line = first_line + chunk.count(b"\n", 0, e.start)
            col = e.start - (chunk.rfind(b"\n", 0, e.start) + 1) + 1
            raise RecordFileError(
                f"{path}: not valid UTF-8 at line {line}, byte column {col}: {e.reason}"
            ) from None

    if data.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 BOM (Windows editors)
        data = data[3:]

    if suffix == ".json":
        text = decode(data, 1)
        del data
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordFileError(
                f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from None
        del text
        if not isinstance(value, list):
            raise RecordFileError(
                f"{path}: top-level JSON value must be a list of records, got {type(value).__name__}"
            )
        return [(i, v, None) for i, v in enumerate(value)], digest

    entries: list[tuple[int, Any, str | None]] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines are not entries
        line = decode(raw, lineno)
        try:
            entries.append((len(entries), json.loads(line), None))
        except json.JSONDecodeError as e:
            entries.append(
                (len(entries), None, f"malformed JSON on line {lineno}: {e.msg} (column {e.colno})")
            )
    return entries, digest


def _record_id(rec: dict[str, Any]) -> str:
    if "id" not in rec:
        raise _Invalid("missing 'id'")
    rid = rec["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise _Invalid(f"'id' must be a string or integer, got {type(rid).__name__}")
    rid = str(rid)
    if not rid.strip():
        raise _Invalid("'id' is empty")
    return rid


def _turn_error(n: int, t: Any, expected: str) -> None:
    """Slow path of ``_turns``: raise the precise reason for turn ``n``."""
    if not isinstance(t, dict):
        raise _Invalid(f"turn {n} is not an object (got {type(t).__name__})")
    role, text = t.get("from"), t.get("value")
    if not isinstance(role, str):
        raise _Invalid(f"turn {n}: 'from' must be a string, got {type(role).__name__}")
    if not isinstance(text, str):
        raise _Invalid(f"turn {n}: 'value' must be a string, got {type(text).__name__}")
    if role not in _ROLES:
        raise _Invalid(f"turn {n}: role {role!r} is not supported (only 'human' and 'gpt')")
    if role != expected:
        raise _Invalid(
            f"turn {n}: expected {expected!r} but got {role!r} "
            "(turns must alternate, starting with 'human')"
        )
    raise _Invalid(f"empty answer in turn {n}")


def _turns(rec: dict[str, Any]) -> tuple[Turn, ...]:
    """Check the conversation structure: alternating human/gpt, with real answers."""
    if "conversations" not in rec:
        raise _Invalid("missing 'conversations'")
    conv = rec["conversations"]
    if not isinstance(conv, list):
        raise _Invalid(f"'conversations' must be a list, got {type(conv).__name__}")
    if not conv:
        raise _Invalid("'conversations' is empty")
    turns: list[Turn] = []
    expected = HUMAN
    for n, t in enumerate(conv, start=1):
        # Fast path: one comparison covers "is a string" and "is the expected role".
        if type(t) is dict:
            role, text = t.get("from"), t.get("value")
            if role == expected and type(text) is str and (expected == HUMAN or (text and not text.isspace())):
                turns.append(Turn(expected, text))
                expected = GPT if expected == HUMAN else HUMAN
                continue
        _turn_error(n, t, expected)
    if len(turns) == 1:
        raise _Invalid("no answer turn")
    if turns[-1].role == HUMAN:
        raise _Invalid(f"turn {len(turns)}: trailing 'human' turn has no answer")
    return tuple(turns)


def _check_placeholders(turns: tuple[Turn, ...], has_image: bool) -> None:
    """Image records need exactly one ``<image>``, in the first human turn; text-only none."""
    counts = [t.text.count(IMAGE_TOKEN) for t in turns]
    total = sum(counts)
    if total == (1 if has_image else 0) and (not has_image or counts[0] == 1):
        return  # the common case, decided without building any message
    where = [(n, c) for n, c in enumerate(counts, start=1) if c]
    desc = ", ".join(f"turn {n}" + (f" x{c}" if c > 1 else "") for n, c in where)
    if has_image:
        if total != 1:
            found = f"found {total}" + (f" ({desc})" if where else "")
            raise _Invalid(f"image record must have exactly one '<image>' placeholder, {found}")
        raise _Invalid(
            f"the '<image>' placeholder must be in the first human turn, found in turn {where[0][0]}"
        )
    raise _Invalid(f"text-only record must have no '<image>' placeholder, found {total} ({desc})")


def load_records(
    path: str | Path,
    image_root: str | Path | None,
    *,
    check_images: bool = True,
    subtasks: str = "forbid-mixed",
) -> LoadedRecords:
    """Load a pool or benchmark split, keeping valid records and explaining every skipped one.

    ``image_root`` may be None only for text-only data (an image record then becomes a
    problem).  ``check_images`` stats each image file (no decode); without it paths are
    only confined lexically and through directory symlinks.  ``subtasks`` is
    ``"forbid-mixed"`` (subtask on every valid record or on none, else RecordFileError;
    a non-string subtask is a record problem) or ``"ignore"``.  A JSON ``null`` for
    ``image``/``subtask`` means absent; an empty subtask string counts as no subtask.

    Raises RecordFileError for whole-file problems (unreadable, non-UTF-8, malformed
    ``.json``, top level not a list, mixed subtasks).
    """
    if subtasks not in _SUBTASK_MODES:
        raise ValueError(f"subtasks must be one of {_SUBTASK_MODES}, got {subtasks!r}")
    with gc_paused():
        return _load(Path(path), image_root, check_images, subtasks == "forbid-mixed")


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a block (process-wide). A parsed pool is millions
    of live containers; with the collector on, every allocation burst re-scans them (measured:
    ~2x slower parsing, 2.5x slower image lookups after it). Loading records builds no
    reference cycles, so nothing is left for the collector but time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load(path: Path, image_root: str | Path | None, check_images: bool, forbid_mixed: bool) -> LoadedRecords:
    fname = str(path)
    entries, digest = _read_entries(path)
    resolver = _ImageResolver(image_root) if image_root is not None else None

    records: list[Record] = []
    problems: list[RecordProblem] = []
    first_seen: dict[str, int] = {}

    for index, rec, parse_error in entries:
        rid: str | None = None
        try:
            if parse_error is not None:
                raise _Invalid(parse_error)
            if not isinstance(rec, dict):
                raise _Invalid(f"record is not a JSON object (got {type(rec).__name__})")
            rid = _record_id(rec)
            # Duplicates are judged among all entries with a usable id, valid or not:
            # an id seen twice is ambiguous whichever copy is broken.
            first = first_seen.setdefault(rid, index)
            if first != index:
                raise _Invalid(f"duplicate id '{rid}' (first seen at record #{first})")

            image = rec.get("image")
            image_abs: str | None = None
            if image is not None:
                if isinstance(image, list):
                    raise _Invalid("multiple images are not supported")
                if not isinstance(image, str):
                    raise _Invalid(f"'image' must be a string, got {type(image).__name__}")
                if image == "":
                    raise _Invalid("image path is empty")
                if resolver is None:
                    raise _Invalid("record has an image but no image root was given")
                image_abs = resolver.resolve(image)

            turns = _turns(rec)
            _check_placeholders(turns, image is not None)

            subtask = rec.get("subtask")
            if subtask is not None and not isinstance(subtask, str):
                if forbid_mixed:
                    raise _Invalid(f"'subtask' must be a string, got {type(subtask).__name__}")
                subtask = None
            if subtask is not None and not subtask.strip():
                subtask = None

            if image_abs is not None and check_images:
                assert resolver is not None
                image_abs = resolver.check_file(image_abs, image)
        except _Invalid as e:
            problems.append(RecordProblem(fname, index, rid, e.args[0]))
            continue

        records.append(
            Record(
                id=rid,
                image=image,
                image_path=Path(image_abs) if image_abs is not None else None,
                turns=turns,
                subtask=subtask,
                raw_json=_RAW_ENCODER.encode(rec),
                index=index,
            )
        )

    if forbid_mixed and records:
        missing = [r.id for r in records if r.subtask is None]
        if 0 < len(missing) < len(records):
            shown = ", ".join(f"'{i}'" for i in missing[:_MIXED_IDS_SHOWN])
            more = f" and {len(missing) - _MIXED_IDS_SHOWN} more" if len(missing) > _MIXED_IDS_SHOWN else ""
            raise RecordFileError(
                f"{fname}: subtask must be on every record or on none: "
                f"{len(records) - len(missing)} of {len(records)} valid records have one; "
                f"records without one: {shown}{more}"
            )

    return LoadedRecords(path, tuple(records), tuple(problems), digest)
