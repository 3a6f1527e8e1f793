"""Fine-tuning data: JSONL/CSV/folder forms, relative paths, and every bad line reported with file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _finetune_testlib import write_image

from blip_tools import BlipSettings, InvalidInput
from blip_tools.finetune import FinetuneConfig
from blip_tools.finetune.data import IssueLog, find_data_file, read_examples
from blip_tools.runtime import VQA_TEMPLATE

SETTINGS = BlipSettings(model="unused", device="cpu", dtype="float32")


def _jsonl(folder: Path, lines: list[str], name: str = "captions.jsonl") -> Path:
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _bad_folder(tmp_path: Path) -> Path:
    """Good rows on lines 1, 4, 9; one bad row of each kind on the others (7 is blank and not data)."""
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "sub" / "b.png", 2)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # truncated PNG
    (tmp_path / "text.png").write_text("not an image")
    _jsonl(
        tmp_path,
        [
            json.dumps({"image": "a.png", "caption": "a red dog"}),  # 1 good
            '{"image": "a.png", "caption": ',  # 2 malformed JSON
            json.dumps({"image": "missing.png", "caption": "a cat"}),  # 3 missing image
            json.dumps({"image": "sub/b.png", "question": "what color?", "answer": "red"}),  # 4 good (VQA)
            json.dumps({"image": "broken.png", "caption": "a car"}),  # 5 unreadable image
            json.dumps({"image": "a.png", "caption": "   "}),  # 6 empty caption
            "",  # 7 blank
            json.dumps({"image": "text.png", "caption": "a bus"}),  # 8 unreadable image
            json.dumps({"image": str((tmp_path / "a.png").resolve()), "caption": "two\n  dogs"}),  # 9 good (abs)
            json.dumps(["a.png", "caption"]),  # 10 not an object
            json.dumps({"image": "a.png"}),  # 11 no caption
            json.dumps({"image": "a.png", "question": "what?", "answer": ""}),  # 12 empty answer
        ],
    )
    return tmp_path


def test_skip_reports_every_bad_line_by_number(tmp_path: Path) -> None:
    folder = _bad_folder(tmp_path)
    log = IssueLog("skip")
    ds = read_examples(folder, SETTINGS, log)
    assert ds.file == folder / "captions.jsonl"
    lines = {i.line: i.reason for i in ds.issues}
    assert sorted(lines) == [2, 3, 5, 6, 8, 10, 11, 12]
    assert "not valid JSON" in lines[2]
    assert lines[2].endswith("at column 31)"), lines[2]  # where the line ends, not column 1 of the next line
    assert "missing image" in lines[3]
    assert "unreadable image" in lines[5] and "unreadable image" in lines[8]
    assert lines[6] == "empty caption"
    assert "expected a JSON object" in lines[10]
    assert "needs 'caption'" in lines[11]
    assert lines[12] == "empty answer"
    assert all(i.file == str(folder / "captions.jsonl") for i in ds.issues)
    assert log.issues == ds.issues
    # Good rows: relative paths resolved against the data file's folder; VQA uses the runtime's template.
    assert [e.source.rsplit(":", 1)[1] for e in ds.examples] == ["1", "4", "9"]
    cap, vqa, absolute = ds.examples
    assert cap.image == folder / "a.png" and cap.prompt is None and cap.target == "a red dog"
    assert vqa.image == folder / "sub" / "b.png" and vqa.target == "red"
    assert vqa.prompt == VQA_TEMPLATE.format(question="what color?")
    assert absolute.target == "two dogs"  # whitespace (a newline would end the caption) collapsed
    log.check("x")  # skip never raises


def test_stop_lists_every_bad_line(tmp_path: Path) -> None:
    folder = _bad_folder(tmp_path)
    log = IssueLog("stop")
    read_examples(folder, SETTINGS, log)
    with pytest.raises(InvalidInput) as err:
        log.check("the data")
    message = str(err.value)
    assert "8 bad line(s)" in message
    for line in (2, 3, 5, 6, 8, 10, 11, 12):
        assert f"captions.jsonl:{line}:" in message
    assert "on_error='skip'" in message


def test_csv_rows_and_line_numbers(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "x.png", 3)
    (tmp_path / "data.csv").write_text(
        "image,caption\n"
        "imgs/x.png,a small boat\n"  # 2
        'imgs/x.png,"a caption\nover two lines"\n'  # 3-4 (quoted newline)
        "imgs/none.png,a bird\n"  # 5 missing
        "imgs/x.png,a,b\n"  # 6 too many fields
        "imgs/x.png,\n"  # 7 empty caption
    )
    log = IssueLog("skip")
    ds = read_examples(tmp_path, SETTINGS, log)  # the folder's only data file
    assert ds.file.name == "data.csv"
    assert [e.target for e in ds.examples] == ["a small boat", "a caption over two lines"]
    assert {i.line: i.reason.split(":")[0] for i in ds.issues} == {
        5: "missing image",
        6: "malformed line",
        7: "empty caption",
    }


def test_vqa_csv(tmp_path: Path) -> None:
    write_image(tmp_path / "q.png", 4)
    (tmp_path / "vqa.csv").write_text("image,question,answer\nq.png,how many dogs?,two\n")
    ds = read_examples(tmp_path / "vqa.csv", SETTINGS, IssueLog("stop"))
    (ex,) = ds.examples
    assert ex.prompt == "Question: how many dogs? Answer:" and ex.target == "two"


def test_find_data_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        find_data_file(tmp_path / "nope")
    with pytest.raises(InvalidInput, match="No data file"):
        find_data_file(tmp_path)
    (tmp_path / "a.csv").write_text("image,caption\n")
    (tmp_path / "b.csv").write_text("image,caption\n")
    with pytest.raises(InvalidInput, match="Several data files"):
        find_data_file(tmp_path)
    (tmp_path / "data.jsonl").write_text("")
    assert find_data_file(tmp_path).name == "data.jsonl"  # a conventional name wins
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(InvalidInput, match=r"\.jsonl or \.csv"):
        find_data_file(tmp_path / "x.txt")


def test_config_validation_is_readable() -> None:
    with pytest.raises(InvalidInput, match=r"lr: .*greater than 0"):
        FinetuneConfig.from_options(lr=0)
    with pytest.raises(InvalidInput, match="bogus"):
        FinetuneConfig.from_options(bogus=1)
    with pytest.raises(InvalidInput, match="on_error"):
        IssueLog("ignore")  # type: ignore[arg-type]
    assert FinetuneConfig.from_options(FinetuneConfig(epochs=2), lr=1e-3).epochs == 2


def test_csv_unclosed_quote_is_a_bad_line_not_a_merged_caption(tmp_path: Path) -> None:
    write_image(tmp_path / "img" / "0.png", 5)
    (tmp_path / "data.csv").write_text(
        'image,caption\nimg/0.png,"a red car\nimg/0.png,a blue bike\nimg/0.png,a green tree\n'
    )
    log = IssueLog("stop")
    ds = read_examples(tmp_path / "data.csv", SETTINGS, log)
    assert ds.examples == []
    (issue,) = ds.issues
    assert issue.line == 2 and "closing quote" in issue.reason and "Lines 2-4 were not read" in issue.reason
    with pytest.raises(InvalidInput, match=r"data\.csv:2: malformed line"):
        log.check("the data")
    # A stray quote inside an unquoted field is reported too (the lenient reader dropped it silently).
    (tmp_path / "data.csv").write_text('image,caption\nimg/0.png,"a red" car\nimg/0.png,a bike\n')
    ds = read_examples(tmp_path / "data.csv", SETTINGS, IssueLog("skip"))
    assert [i.line for i in ds.issues] == [2] and [e.target for e in ds.examples] == ["a bike"]


def test_caption_list_gives_one_example_per_caption_and_other_types_are_bad_lines(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 6)
    _jsonl(
        tmp_path,
        [
            json.dumps({"image": "a.png", "caption": ["a red car", " a  car "]}),  # 1: two examples
            json.dumps({"image": "a.png", "caption": 42}),  # 2
            json.dumps({"image": "a.png", "caption": []}),  # 3
            json.dumps({"image": "a.png", "caption": ["ok", 3]}),  # 4
            json.dumps({"image": "a.png", "caption": ["ok", " "]}),  # 5
            json.dumps({"image": "a.png", "question": "how many?", "answer": 2}),  # 6
            json.dumps({"image": "a.png", "caption": "fine", "prompt": {"x": 1}}),  # 7
        ],
    )
    ds = read_examples(tmp_path, SETTINGS, IssueLog("skip"))
    assert [(e.target, e.source.rsplit(":", 1)[1]) for e in ds.examples] == [("a red car", "1"), ("a car", "1")]
    reasons = {i.line: i.reason for i in ds.issues}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7]
    assert reasons[2] == "malformed line: 'caption' must be a string (in quotes), got a number"
    assert reasons[3] == "empty caption list"
    assert "caption 2 of the list must be a string" in reasons[4]
    assert reasons[5] == "empty caption in the list"
    assert "'answer' must be a string" in reasons[6] and "'prompt' must be a string" in reasons[7]


def test_a_bom_is_not_data_and_bytes_that_are_not_utf8_are_bad_lines(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 7)
    # Excel's "CSV UTF-8" and older Notepad start the file with a BOM: the header and first row are still read.
    (tmp_path / "bom.csv").write_bytes("\ufeffimage,caption\r\na.png,a red shoe\r\n".encode())
    (tmp_path / "bom.jsonl").write_bytes(("\ufeff" + json.dumps({"image": "a.png", "caption": "a red shoe"})).encode())
    for name in ("bom.csv", "bom.jsonl"):
        ds = read_examples(tmp_path / name, SETTINGS, IssueLog("stop"))
        assert [e.target for e in ds.examples] == ["a red shoe"] and ds.issues == [], name
    # Two such JSONL files joined with `cat`: the second BOM starts a line in the middle.
    bom = (tmp_path / "bom.jsonl").read_bytes()
    (tmp_path / "joined.jsonl").write_bytes(bom + b"\n" + bom)
    ds = read_examples(tmp_path / "joined.jsonl", SETTINGS, IssueLog("stop"))
    assert [e.target for e in ds.examples] == ["a red shoe"] * 2
    # A Latin-1 "é" is reported (with the line), not trained as "caf\ufffd".
    (tmp_path / "latin1.csv").write_bytes("image,caption\na.png,a café chair\na.png,a plain chair\n".encode("latin-1"))
    row = json.dumps({"image": "a.png", "caption": "a café chair"}, ensure_ascii=False)
    (tmp_path / "latin1.jsonl").write_bytes(row.encode("latin-1") + b"\n" + row.encode() + b"\n")
    ds = read_examples(tmp_path / "latin1.csv", SETTINGS, IssueLog("skip"))
    assert [e.target for e in ds.examples] == ["a plain chair"]
    (issue,) = ds.issues
    assert issue.line == 2 and issue.reason.startswith("not UTF-8 text (byte 0xe9 after 'a.png,a caf')"), issue
    ds = read_examples(tmp_path / "latin1.jsonl", SETTINGS, IssueLog("skip"))
    assert [e.target for e in ds.examples] == ["a café chair"] and [i.line for i in ds.issues] == [1]
    # UTF-16 ("Unicode" in Windows tools) is refused as a whole, with what to do.
    (tmp_path / "utf16.jsonl").write_bytes(row.encode("utf-16"))
    with pytest.raises(InvalidInput, match="is UTF-16 text: save it as UTF-8"):
        read_examples(tmp_path / "utf16.jsonl", SETTINGS, IssueLog("skip"))


def test_caption_and_vqa_rows_mix_in_one_csv_and_a_row_with_both_gives_both(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 8)
    (tmp_path / "mixed.csv").write_text(
        "image,caption,question,answer\n"
        "a.png,a black boot,,\n"  # 2: caption row (the question and answer cells are empty)
        "a.png,,what material?,leather\n"  # 3: VQA row (the caption cell is empty)
        "a.png,a brown boot,what color?,brown\n"  # 4: both
        "a.png,,,\n"  # 5: nothing to train
        "a.png,,what size?,\n"  # 6: a question without an answer
    )
    ds = read_examples(tmp_path / "mixed.csv", SETTINGS, IssueLog("skip"))
    vqa = VQA_TEMPLATE.format
    assert [(e.source.rsplit(":", 1)[1], e.prompt, e.target) for e in ds.examples] == [
        ("2", None, "a black boot"),
        ("3", vqa(question="what material?"), "leather"),
        ("4", vqa(question="what color?"), "brown"),
        ("4", None, "a brown boot"),
    ]
    assert {i.line: i.reason for i in ds.issues} == {5: "empty caption", 6: "empty answer"}
    # The same in JSONL: a row with a caption and a question/answer trains both, dropping neither.
    _jsonl(tmp_path, [json.dumps({"image": "a.png", "caption": "a boot", "question": "what?", "answer": "a boot"})])
    ds = read_examples(tmp_path / "captions.jsonl", SETTINGS, IssueLog("stop"))
    assert sorted((e.prompt or "", e.target) for e in ds.examples) == [
        ("", "a boot"),
        (vqa(question="what?"), "a boot"),
    ]


def test_a_missing_image_says_when_its_path_was_written_relative_to_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_image(tmp_path / "data" / "img" / "a.png", 1)
    data = _jsonl(
        tmp_path / "data",
        [
            json.dumps({"image": "data/img/a.png", "caption": "a dog"}),  # relative to the cwd, not the data file
            json.dumps({"image": "https://example.com/a.png", "caption": "a cat"}),
            json.dumps({"image": "img/nowhere.png", "caption": "a cow"}),
            json.dumps({"image": "img\\a.png", "caption": "a hen"}),  # a Windows path
            json.dumps({"file_name": "img/a.png", "text": "a pig"}),  # a Hugging Face metadata.jsonl row
            json.dumps({"image": "img/a.png", "text": "a pig"}),
        ],
    )
    monkeypatch.chdir(tmp_path)
    log = IssueLog("skip")
    read_examples(Path("data") / data.name, SETTINGS, log)
    reasons = [issue.reason for issue in log.issues]
    assert len(reasons) == 6 and all(reason.startswith("missing image: ") for reason in reasons[:4])
    assert reasons[0].endswith(
        "(data/img/a.png is relative to the current folder, but image paths are relative to the data file's folder "
        "data: write them relative to it, or absolute)"
    )
    assert reasons[1].endswith("(images are read from files only: download them and give their paths)")
    assert reasons[2] == "missing image: data/img/nowhere.png does not exist"
    assert reasons[3].endswith("does not exist (write paths with /, not \\)")
    missing_image = "malformed line: missing 'image' (a path relative to the data file)"
    assert reasons[4] == f"{missing_image}; it has 'file_name', 'text': rename the fields"
    assert reasons[5] == "malformed line: needs 'caption', or 'question' and 'answer'; it has 'text': rename the fields"


def test_hidden_files_beside_the_data_file_are_not_data(tmp_path: Path) -> None:
    data = tmp_path / "labels.csv"
    data.write_text("image,caption\na.png,a dog\n")
    (tmp_path / "._labels.csv").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork of labels.csv
    assert find_data_file(tmp_path) == data


def test_an_image_path_too_long_for_the_filesystem_is_a_bad_line_not_a_crash(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 1)
    inline = "data:image/png;base64," + "A" * 5000  # an image embedded in the data file
    data = _jsonl(
        tmp_path,
        [
            json.dumps({"image": "a.png", "caption": "a dog"}),
            json.dumps({"image": inline, "caption": "a cat"}),
            json.dumps({"image": "x" * 300 + ".png", "caption": "a cow"}),  # over the 255-byte name limit
        ],
    )
    log = IssueLog("skip")
    ds = read_examples(data, SETTINGS, log)
    assert [e.target for e in ds.examples] == ["a dog"]
    first, second = (issue.reason for issue in log.issues)
    assert first.startswith(f"unreadable image path {inline[:120]}... (5022 characters): File name too long")
    assert first.endswith("(images are read from files only: save each as a file and give its path)")
    assert len(first) < 400 and second.startswith("unreadable image path xxx")


def test_a_data_file_that_cannot_be_read_is_one_typed_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _jsonl(tmp_path, [json.dumps({"image": "a.png", "caption": "a dog"})])
    real_open = Path.open

    def open_(self: Path, *args: object, **kwargs: object) -> object:
        if self == data:  # as for a file of another user (chmod 600), or on a network share that went away
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(InvalidInput, match=f"^Cannot read the data file {data}: Permission denied.$"):
        read_examples(tmp_path, SETTINGS, IssueLog("stop"))

    def iterdir(self: Path) -> object:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", iterdir)
    data.unlink()  # a folder without captions.jsonl is listed to find its data file
    with pytest.raises(InvalidInput, match=f"^Cannot read the data {tmp_path}: Permission denied.$"):
        read_examples(tmp_path, SETTINGS, IssueLog("stop"))
