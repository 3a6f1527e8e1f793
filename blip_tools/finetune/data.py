"""Fine-tuning data: read a JSONL or CSV of image–caption (or image–question–answer) rows, and check every line.

A row is `{"image": path, "caption": text}` (optional `"prompt"` for prompted captioning) or
`{"image": path, "question": text, "answer": text}` (VQA-style: the prompt is the runtime's
`Question: {question} Answer:` and the target is the answer). Image paths are relative to the data file.
A JSONL caption may also be a list of strings (COCO style: several captions of one image), which gives one
example per caption; any other non-string value is a bad line. A row with both a caption and a question/answer
gives one example of each; in a CSV with all three columns a row's empty cells are the fields it does not use.
Files are UTF-8 (a leading BOM is fine); a line with bytes that are not UTF-8 is a bad line, never trained garbled.

Every bad line is reported with its file and line number (missing image, unreadable image, empty caption,
malformed line). With `on_error="stop"` any bad line stops the run before training, listing all of them;
with `on_error="skip"` each is logged as a warning and listed in the report. Nothing is silently dropped.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import BlipError, InvalidInput
from ..images import load_image
from ..settings import BlipSettings

logger = logging.getLogger(__name__)

OnError = Literal["skip", "stop"]

DATA_FILE_NAMES = ("captions.jsonl", "data.jsonl", "train.jsonl")
"""File names looked for, in this order, when `data` is a folder (then a single `*.jsonl` or `*.csv`)."""

MAX_LISTED_ISSUES = 20
"""How many bad lines an error message lists before it says `... and N more`."""


@dataclass(frozen=True)
class DataIssue:
    """One bad line of a data file: where it is and what is wrong with it."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class Example:
    """One training pair: an image, an optional prompt, and the text the model should produce after it."""

    image: Path
    """Absolute path of the image file."""
    target: str
    """Caption or answer, whitespace collapsed to single spaces."""
    prompt: str | None
    """None for plain captioning; the prompt prefix otherwise (VQA: `Question: ... Answer:`)."""
    source: str
    """`file:line` of the row, for messages."""


@dataclass
class Dataset:
    """Checked examples and the lines that were skipped."""

    file: Path
    examples: list[Example] = field(default_factory=list)
    issues: list[DataIssue] = field(default_factory=list)


class IssueLog:
    """Applies the `on_error` policy: collect bad lines, warn for `skip`, refuse to go on for `stop`."""

    def __init__(self, on_error: OnError) -> None:
        if on_error not in ("skip", "stop"):
            raise InvalidInput(f"on_error must be 'skip' or 'stop', got {on_error!r}")
        self.on_error = on_error
        self.issues: list[DataIssue] = []

    def add(self, issue: DataIssue) -> None:
        """Record one bad line (and warn about it when skipping)."""
        self.issues.append(issue)
        if self.on_error == "skip":
            logger.warning("skipping %s", issue)

    def check(self, what: str) -> None:
        """With `stop`, raise `InvalidInput` listing every recorded bad line."""
        if self.on_error == "stop" and self.issues:
            raise InvalidInput(format_issues(self.issues, what))


def format_issues(issues: list[DataIssue], what: str) -> str:
    """A readable message listing bad lines (at most `MAX_LISTED_ISSUES`) and how to go on."""
    shown = "\n".join(f"  {issue}" for issue in issues[:MAX_LISTED_ISSUES])
    more = f"\n  ... and {len(issues) - MAX_LISTED_ISSUES} more" if len(issues) > MAX_LISTED_ISSUES else ""
    return (
        f"{len(issues)} bad line(s) in {what}:\n{shown}{more}\n"
        "Fix these lines, or pass on_error='skip' (--on-error skip) to train without them."
    )


def find_data_file(data: str | Path) -> Path:
    """The data file itself, or the one data file inside a folder."""
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix.lower() not in (".jsonl", ".csv"):
            raise InvalidInput(f"Data file {path} must end in .jsonl or .csv, got '{path.suffix}'.")
        return path
    if not path.is_dir():
        raise InvalidInput(f"Data {path} does not exist: pass a .jsonl or .csv file, or a folder holding one.")
    for name in DATA_FILE_NAMES:
        if (path / name).is_file():
            return path / name
    # Hidden files are not data: macOS leaves `._name.csv` resource forks beside every file copied to another disk.
    candidates = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".jsonl", ".csv") and p.name[0] != "."
    )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InvalidInput(
            f"No data file in {path}: put a captions.jsonl (or data.jsonl, or one *.csv) there, with rows "
            'like {"image": "img1.jpg", "caption": "a red car"}.'
        )
    names = ", ".join(p.name for p in candidates)
    raise InvalidInput(f"Several data files in {path} ({names}): pass the one to use as --data FILE.")


# "utf-8-sig": a leading BOM (Excel's "CSV UTF-8", older Notepad) is not part of the first line. "surrogateescape":
# a byte that is not UTF-8 becomes a lone surrogate that `_not_utf8` reports, instead of a U+FFFD that would train.
_ENCODING, _ERRORS = "utf-8-sig", "surrogateescape"


def _not_utf8(text: str, how: str = "as UTF-8") -> str | None:
    """Why a line read with `surrogateescape` is not UTF-8 text, or None if it is."""
    for i, ch in enumerate(text):
        if "\udc80" <= ch <= "\udcff":
            after = f" after {text[max(0, i - 20) : i].lstrip()!r}" if text[:i].strip() else ""
            return f"not UTF-8 text (byte 0x{ord(ch) - 0xDC00:02x}{after}): save the file {how}"
    return None


def _check_not_utf16(file: Path) -> None:
    """A UTF-16 file (Windows "Unicode" text) would be reported line by line as garbage: say what it is once."""
    with file.open("rb") as fh:
        head = fh.read(2)
    if head in (b"\xff\xfe", b"\xfe\xff"):
        raise InvalidInput(f"Data file {file} is UTF-16 text: save it as UTF-8 (in Excel: CSV UTF-8), not Unicode.")


def _jsonl_rows(file: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row) for every non-blank line; a string instead of a row says why it is malformed."""
    with file.open(encoding=_ENCODING, errors=_ERRORS) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if (problem := _not_utf8(line)) is not None:
                yield number, problem
                continue
            try:
                # rstrip: else an unclosed object is reported at column 1 of line+1. lstrip: files joined with
                # `cat a.jsonl b.jsonl` keep b's BOM at the start of its first line, where it is no more data than
                # at the start of the file.
                row = json.loads(line.rstrip("\r\n").lstrip("\ufeff"))
            except json.JSONDecodeError as exc:
                yield number, f"malformed line: not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(row, dict):
                yield number, f"malformed line: expected a JSON object, got {type(row).__name__}"
                continue
            yield number, row


def _csv_rows(file: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row) for every CSV record after the header; line numbers are where the record starts."""
    with file.open(encoding=_ENCODING, errors=_ERRORS, newline="") as fh:
        reader = csv.reader(fh, strict=True)  # not strict: an unclosed quote swallows the rest of the file
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield 1, f"malformed header: {exc}"
            return
        header = [h.strip().lower() for h in header]
        if "image" not in header:
            yield 1, f"malformed header: needs an 'image' column, got {header}"
            return
        start = reader.line_num + 1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, _csv_problem(exc, start, reader.line_num)
                start = reader.line_num + 1
                continue
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(header):
                yield line, f"malformed line: {len(record)} fields, the header has {len(header)}"
                continue
            if (problem := _not_utf8(",".join(record), "as UTF-8 (in Excel: CSV UTF-8)")) is not None:
                yield line, problem
                continue
            yield line, dict(zip(header, record, strict=True))


def _csv_problem(exc: csv.Error, start: int, end: int) -> str:
    """Why a CSV record is malformed; a record that ran over several lines is most likely an unclosed quote."""
    reason = f"malformed line: {exc}"
    if end > start:
        ends = "the end of the file" if "end of data" in str(exc) else f"line {end}"
        reason += (
            f" (a quoted field opened on this line runs to {ends}: is a closing quote missing? Lines {start}-{end} "
            "were not read)"
        )
    return reason


class _BadValue(Exception):
    """A row's field has the wrong type; its message is the reason reported for the line."""


def _text(row: dict[str, Any], key: str) -> str | None:
    """The field as text with whitespace collapsed, None if absent (or null); not a string → `_BadValue`."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _BadValue(f"malformed line: '{key}' must be a string (in quotes), got {_kind(value)}")
    return " ".join(value.split())


def _captions(row: dict[str, Any]) -> list[str] | str:
    """The row's caption(s): a string, or a list of strings (one example each); else why not."""
    value = row.get("caption")
    if not isinstance(value, list):
        return [_text(row, "caption") or ""]
    if not value:
        return "empty caption list"
    captions: list[str] = []
    for n, item in enumerate(value, start=1):
        if not isinstance(item, str):
            return f"malformed line: caption {n} of the list must be a string, got {_kind(item)}"
        captions.append(" ".join(item.split()))
    return captions


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "a list"}
    return names.get(type(value), type(value).__name__)


def _example(row: dict[str, Any], base: Path, source: str) -> list[Example] | str:
    """Turn one row into its `Example`s (one per caption), or say why it cannot (image checks come later)."""
    try:
        return _examples(row, base, source)
    except _BadValue as exc:
        return str(exc)


def _examples(row: dict[str, Any], base: Path, source: str) -> list[Example] | str:
    from ..runtime import VQA_TEMPLATE

    image = row.get("image")
    if not isinstance(image, str) or not image.strip():
        return "malformed line: missing 'image' (a path relative to the data file)" + _keys(row)
    pairs: list[tuple[str | None, str]] = []  # (prompt, target)
    question, answer = _text(row, "question"), _text(row, "answer")
    # A CSV with caption, question and answer columns leaves the unused ones empty on each row: an empty
    # question/answer beside a caption column is absent, an empty caption beside a question is too.
    if (question or answer) or ({"question", "answer"} & row.keys() and "caption" not in row):
        if not question:
            return "empty question"
        if not answer:
            return "empty answer"
        pairs.append((VQA_TEMPLATE.format(question=question), answer))
    if "caption" in row and not (pairs and _blank(row["caption"])):
        captions = _captions(row)
        if isinstance(captions, str):
            return captions
        if not all(captions):
            return "empty caption" if len(captions) == 1 else "empty caption in the list"
        prompt = _text(row, "prompt") or None
        pairs.extend((prompt, caption) for caption in captions)  # with a question too: one example of each
    if not pairs:
        return "malformed line: needs 'caption', or 'question' and 'answer'" + _keys(row)
    if any("<image>" in target or (prompt and "<image>" in prompt) for prompt, target in pairs):
        return "malformed line: text contains the reserved token '<image>'"
    path = Path(image.strip()).expanduser()
    if not path.is_absolute():
        path = base / path
    return [Example(image=path, target=target, prompt=prompt, source=source) for prompt, target in pairs]


def _keys(row: dict[str, Any]) -> str:
    """The row's field names, for a row whose fields are named otherwise (e.g. `file_name`/`text` of HF datasets)."""
    names = [str(key) for key in row if key not in ("image", "caption", "question", "answer", "prompt")]
    if not names:
        return ""
    shown = ", ".join(repr(name[:40]) for name in names[:6]) + (", ..." if len(names) > 6 else "")
    return f"; it has {shown}: rename the fields"


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def read_examples(data: str | Path, settings: BlipSettings, log: IssueLog, *, check_images: bool = True) -> Dataset:
    """Read and check every line of a data file (or a folder's data file).

    Args:
        data: a `.jsonl` or `.csv` file, or a folder holding `captions.jsonl`, `data.jsonl` or one data file.
        settings: image limits used when checking images (`max_image_bytes`, `max_image_pixels`, `allowed_dirs`).
        log: where bad lines go; the caller decides when to `check()` it.
        check_images: decode every image once (catches missing, truncated and non-image files up front).
    """
    try:
        file = find_data_file(data)
    except OSError as exc:  # a folder that cannot be listed
        raise InvalidInput(f"Cannot read the data {data}: {exc.strerror or exc}.") from exc
    try:
        return _read(file, settings, log, check_images)
    except OSError as exc:  # the data file itself (images map theirs): permission denied, a share gone, I/O error
        raise InvalidInput(f"Cannot read the data file {file}: {exc.strerror or exc}.") from exc


def _read(file: Path, settings: BlipSettings, log: IssueLog, check_images: bool) -> Dataset:
    _check_not_utf16(file)
    rows = _csv_rows(file) if file.suffix.lower() == ".csv" else _jsonl_rows(file)
    dataset = Dataset(file=file)
    base = file.parent
    checked: dict[Path, str | None] = {}
    for number, row in rows:
        source = f"{file}:{number}"
        item = row if isinstance(row, str) else _example(row, base, source)
        if not isinstance(item, str) and check_images:
            image = item[0].image
            if image not in checked:
                given = str(row.get("image", "")).strip() if isinstance(row, dict) else ""
                checked[image] = _image_problem(image, settings, given, base)
            problem = checked[image]
            if problem is not None:
                item = problem
        if isinstance(item, str):
            issue = DataIssue(str(file), number, item)
            log.add(issue)
            dataset.issues.append(issue)
        else:
            dataset.examples.extend(item)
    return dataset


def _image_problem(path: Path, settings: BlipSettings, given: str, base: Path) -> str | None:
    """None if the image decodes, else why not (missing file, unreadable image, over a limit).

    `given` is the path as the line wrote it and `base` the data file's folder, for the hint of a missing image.
    """
    try:
        exists = path.exists()
    except OSError as exc:  # a name no filesystem takes: an inline base64 image, a caption in the image column
        return f"unreadable image path {_shown(given)}: {exc.strerror or exc}{_missing_hint(given, base)}"
    if not exists:
        return f"missing image: {_shown(path)} does not exist{_missing_hint(given, base)}"
    try:
        load_image(path, settings)
    except BlipError as exc:
        return f"unreadable image {path}: {exc}"
    return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _shown(path: str | Path, limit: int = 120) -> str:
    """`path` for a message: a long one (an inline base64 image) cut to its start and its length."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _missing_hint(given: str, base: Path) -> str:
    """What most likely went wrong when the image `given` (as written in the data file) is not found."""
    if given.lower().startswith(("http://", "https://")):
        return " (images are read from files only: download them and give their paths)"
    if given.lower().startswith("data:") or len(given) > 1000:
        return " (images are read from files only: save each as a file and give its path)"
    if given.lower().startswith("file:"):
        return " (give the file's path itself, without file://)"
    if "\\" in given and not _exists(base / given) and _exists(base / given.replace("\\", "/")):
        return " (write paths with /, not \\)"
    as_written = Path(given).expanduser()
    if not as_written.is_absolute() and _exists(as_written):
        return (
            f" ({given} is relative to the current folder, but image paths are relative to the data file's folder "
            f"{base}: write them relative to it, or absolute)"
        )
    return ""


__all__ = [
    "DATA_FILE_NAMES",
    "DataIssue",
    "Dataset",
    "Example",
    "IssueLog",
    "OnError",
    "find_data_file",
    "format_issues",
    "read_examples",
]
