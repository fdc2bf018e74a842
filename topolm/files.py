"""Files: atomic writes, leftovers of interrupted writes, strict UTF-8 text and JSON lines, and the token files.

Every file the code writes goes through `atomic_write`: written under a temporary name, flushed to
disk, then renamed into place, so a reader never sees a partial file; leftovers of a killed writer
are removed when the folder is next started (`remove_partial_writes`). A write the system refuses
(full disk, quota, `ulimit -f`) is one `error:` line naming the file (`write_error`); commands check
with `require_writable` that their output folder takes files before they start the work.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from topolm.config import UserError
from topolm.distributed import print0


# ----------------------------------------------------------------------------- files

# A full disk, a quota or a file-size limit (`ulimit -f`): the user's to fix, not a fault of the code.
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def write_error(path: Path, err: OSError) -> UserError:
    """The one-line refusal for a file that could not be written: names `path`, the system's reason
    and, for a full disk, a quota or a file-size limit, what to do."""
    reason = err.strerror or str(err)
    if err.errno in _NO_ROOM:
        return UserError(f"cannot write {path}: {reason} (the disk, a quota or a file-size limit is full); free "
                         f"space or write elsewhere, then run again; an earlier {Path(path).name}, if any, is kept")
    return UserError(f"cannot write {path}: {reason}; check that the folder exists and can be written")


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write. Writers such as torch.save report a
    failed write as their own RuntimeError; the recorded error says what really happened."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write(path: Path, content: str | bytes | Callable[[Any], None]) -> None:
    """Write a file so that readers see the old file or the complete new one, never a part.

    `content` is text (UTF-8), bytes, or a function that writes to the open binary file. The data go
    to `<name>.tmp<pid>` beside the target, are flushed to disk and renamed over it; the folder entry is
    synced too. A leftover `*.tmp*` from a killed writer is never read as a result.
    Raises UserError (`write_error`) when the system refuses the write (full disk, quota, file-size
    limit, no permission); the partial file is removed and an earlier file at `path` stays as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    recorder = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as raw:
            recorder = _RecordingFile(raw)
            if callable(content):
                content(recorder)
            else:
                recorder.write(content.encode("utf-8") if isinstance(content, str) else content)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        # The rename itself is durable only once the folder entry is on disk.
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except Exception as e:
        cause = recorder.error if recorder is not None and recorder.error is not None else e
        if isinstance(cause, OSError):
            raise write_error(path, cause) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def require_writable(folder: Path) -> Path:
    """Check, before any work, that files can be created in `folder` (made if missing): a probe file is
    written and removed. Raises UserError naming the folder. Returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder; give a folder (or remove the file)")
    probe = folder / f".write-probe.tmp{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as e:
        raise UserError(f"cannot write into {folder}: {e.strerror or e}; choose another folder or fix its "
                        f"permissions (nothing was done)") from None
    probe.unlink()
    return folder


def staging_folder(out: Path) -> Path:
    """A new empty folder `out/.staging.tmp<pid>` for outputs that must appear in `out` all together
    (`commit_staged`) or not at all (`discard_staged`). Its name marks it as an unfinished write, so the
    leftover of a killed command is removed by `remove_partial_writes`."""
    stage = Path(out) / f".staging.tmp{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    return stage


def commit_staged(stage: Path, out: Path) -> None:
    """Move every file of `stage` to the same relative place under `out` (replacing a file there), then
    remove `stage`. Renames within one filesystem: milliseconds, whatever the files' sizes."""
    for path in sorted(p for p in Path(stage).rglob("*") if p.is_file()):
        target = Path(out) / path.relative_to(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    shutil.rmtree(stage)


def discard_staged(stage: Path) -> None:
    """Remove a staging folder and what it holds; `out` stays as it was."""
    shutil.rmtree(stage, ignore_errors=True)


PARTIAL_WRITE_RE = re.compile(r"\.tmp\d*$")


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete the leftovers of interrupted atomic writes (`<name>.tmp<pid>`) in `folder`.

    Called by rank 0 when a run or output folder is started again, before anything is written
    there. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if PARTIAL_WRITE_RE.search(p.name)]
    for p in found:
        if p.is_dir() and not p.is_symlink():  # a staging folder (`staging_folder`)
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if found:
        print0(f"removed {len(found)} unfinished write(s) of an interrupted run in {folder}: "
               + ", ".join(p.name for p in found))
    return found


def decode_utf8(data: bytes, source: str, first_line: int = 1) -> str:
    """`data` decoded as strict UTF-8, nothing translated (newlines, BOM and NUL kept as they are).

    source names the input in the error (a path, or "path, row 12"); first_line is the line number of
    the first byte (for pieces of a larger file; 0 leaves the line out). Raises UserError naming the
    source, line and byte when `data` is not valid UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = ""
        if first_line:
            line = first_line + data.count(b"\n", 0, e.start)
            column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            where = f" line {line}, byte {column}"
        raise UserError(f"{source}{where}: not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8)") from None


def read_text(path: Path) -> str:
    """A text file's content, decoded as UTF-8 exactly (no newline translation; a leading BOM dropped).

    Raises UserError for a missing or unreadable file, or for bytes that are not UTF-8, naming the
    file, the line and the byte where decoding failed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return decode_utf8(raw, str(path)).removeprefix("\ufeff")


# A JSON escape: \uXXXX, or a backslash and the one character it escapes (so an escaped backslash
# before a u starts no \u escape).
_JSON_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.S)


def lone_surrogate(text: str) -> int | None:
    """Offset in the JSON text `text` of the first \\uD800-\\uDFFF escape that is not half of a pair
    (high then low), or None. Such an escape is valid JSON but stands for no character: Python keeps it
    as a lone surrogate, which no UTF-8 writer (Arrow, the tokenizer's output, a file) accepts."""
    if "\\u" not in text:
        return None
    high = None  # (start, end) of a high surrogate escape waiting for its low half
    for m in _JSON_ESCAPE.finditer(text):
        code = int(m.group(1), 16) if m.group(1) else -1
        if high is not None:
            if m.start() == high[1] and 0xDC00 <= code <= 0xDFFF:
                high = None
                continue
            return high[0]
        if 0xD800 <= code <= 0xDBFF:
            high = (m.start(), m.end())
        elif 0xDC00 <= code <= 0xDFFF:
            return m.start()
    return None if high is None else high[0]


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _surrogate_field(value: Any, where: str = "") -> str | None:
    """The key path ('text', 'meta'[2], [1]['text']) of the first string in `value` holding a lone surrogate."""
    if isinstance(value, str):
        return where or "a value" if _SURROGATE.search(value) else None
    if isinstance(value, list):
        paths = ((f"{where}[{i}]", item) for i, item in enumerate(value))
    elif isinstance(value, dict):
        for key in value:
            if _SURROGATE.search(key):
                return f"the key {json.dumps(key)}"
        paths = ((f"{where}[{key!r}]" if where else repr(key), item) for key, item in value.items())
    else:
        return None
    return next((found for path, item in paths if (found := _surrogate_field(item, path))), None)


def _refuse_surrogate(text: str, value: Any, source: str, first_line: int) -> None:
    """Raise UserError naming the source, line and field when the JSON text holds a lone surrogate escape."""
    at = lone_surrogate(text)
    if at is None:
        return
    line = first_line + text.count("\n", 0, at)
    escape = text[at:at + 6]
    field = _surrogate_field(value) or "a string"
    raise UserError(f"{source} line {line}: {field} holds the escape {escape}, half of a UTF-16 pair with no "
                    f"other half, which is no character; write the character itself (as UTF-8) or both halves "
                    f"of its pair")


def require_text_fields(record: dict, fields: Iterable[str], where: str, allow_empty: bool = False) -> None:
    """Refuse a record whose `fields` are missing, not strings, or (unless allow_empty) empty or blank.

    where names the record in the error ("path line 12", "nyu-mll/blimp/wh_island row 3"). Raises
    UserError naming it and the field."""
    for key in fields:
        if key not in record:
            raise UserError(f"{where}: no field '{key}' (its fields: {', '.join(map(str, record)) or 'none'})")
        value = record[key]
        if not isinstance(value, str):
            raise UserError(f"{where}: '{key}' is {json.dumps(value)[:40]}, not a string")
        if not allow_empty and (not value or value.isspace()):
            raise UserError(f"{where}: '{key}' is empty; give it text (or remove the line)")


def read_jsonl(path: Path, required: Iterable[str] = ()) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each JSON object of a JSON-lines file, in order, read as it goes.

    Lines are split at line feeds (b"\\n") only: str.splitlines would also split inside a string holding
    U+2028, U+0085 or a form feed, which JSON keeps as text. Each line is strict UTF-8 (`decode_utf8`); a
    leading byte-order mark, a trailing carriage return and blank lines are skipped. `required` names the
    fields every record must hold as non-empty text (`require_text_fields`). Raises UserError naming the
    file and line for a missing file, bytes that are not UTF-8, a line that is not one JSON object, an
    escaped lone surrogate ("\\ud83d": valid JSON, no character) in any string, or a required field
    missing, not text or empty."""
    path = Path(path)
    required = tuple(required)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):  # binary files split at b"\n" only
            line = decode_utf8(raw, str(path), lineno)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: not JSON ({e.msg}); each line must hold one JSON object") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {lineno}: a JSON {type(record).__name__}, not an object; each line must "
                                f"hold one JSON object")
            _refuse_surrogate(line, record, str(path), lineno)
            require_text_fields(record, required, f"{path} line {lineno}")
            yield lineno, record


def read_json(path: Path) -> Any:
    """The JSON value of a whole file, read with `read_text`. Raises UserError naming the file and line for
    text that is not JSON or holds an escaped lone surrogate (see `read_jsonl`)."""
    text = read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    _refuse_surrogate(text, value, str(path), 1)
    return value


def names_folder(value: str) -> bool:
    """Whether an output path given by the user means a folder: it ends in "/" or is an existing folder."""
    return bool(value) and (value.endswith(("/", os.sep)) or Path(value).is_dir())


def require_json_target(value: str, default_name: str) -> Path | None:
    """The results file of a `json=` key (None when empty; a folder gets default_name inside it,
    `output_file`), its folder checked with `require_writable` before any work."""
    if not value:
        return None
    target = output_file(value, default_name, Path("."))
    require_writable(target.parent)
    return target


def output_file(value: str, default_name: str, default_folder: Path) -> Path:
    """The file an `out=`-style key names: empty gives default_folder/default_name; a value ending in "/"
    (or the name of an existing folder) is a folder, and default_name goes inside it; anything else is
    the file itself. Relative paths are relative to the current directory."""
    if not value:
        return Path(default_folder) / default_name
    return Path(value) / default_name if names_folder(value) else Path(value)


# ----------------------------------------------------------------------------- data

def open_tokens(path: Path, block_size: int, vocab_size: int) -> np.memmap:
    """Open a uint16 token file, refusing files that cannot feed the model."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path} (run the dataset's prepare.py first)")
    size = path.stat().st_size
    if size % 2:
        raise UserError(f"{path} is not a uint16 token file (odd size {size} bytes)")
    n = size // 2
    if n < block_size + 1:
        raise UserError(f"{path} holds {n} tokens; block_size={block_size} needs at least {block_size + 1}: lower "
                        f"block_size or prepare more data")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    max_id = _max_token_id(path, data)
    if max_id >= vocab_size:
        raise UserError(f"{path} holds token id {max_id} >= vocab_size={vocab_size}; set vocab_size >= {max_id + 1} "
                        f"(or prepare the data with the model's tokenizer)")
    return data


def tokens_meta(folder: Path) -> dict:
    """The `meta.json` that a preparer writes beside its token files ({} when missing or unreadable)."""
    meta = Path(folder) / "meta.json"
    try:
        return read_json(meta) if meta.is_file() else {}
    except UserError:
        return {}


def _max_token_id(path: Path, data: np.memmap) -> int:
    """Largest token id, from the meta.json that prepare.py writes, else by scanning the file."""
    meta = path.parent / "meta.json"
    if meta.is_file():
        try:
            info = read_json(meta)
            entry = info.get("files", {}).get(path.name)
            if entry and entry.get("tokens") == len(data) and entry.get("mtime_ns") == path.stat().st_mtime_ns:
                return int(entry["max_token_id"])
        except (UserError, AttributeError, KeyError, TypeError, ValueError):
            pass
    chunk = 1 << 26
    return int(max(int(data[i:i + chunk].max()) for i in range(0, len(data), chunk)))


