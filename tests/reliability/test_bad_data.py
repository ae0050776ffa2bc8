"""Bad data files, through `tether.data.load_preference_data` and through `tether train`.

Promise (DESIGN.md section 4): errors name the file, the row, the field and the fix; bad rows are counted
and reported, never silently dropped. Every case puts one bad line at line 3 of a 4-line JSONL file whose
other lines are good. In error mode the loader raises `DataError` naming file, line and reason (and `tether
train` exits 2 with that message, before any model is loaded); with on_bad_row=skip the line is counted
under its reason and kept + skipped equals the number of lines written (counted here, not by the report).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from tether import cli
from tether.data import DataError, load_preference_data

# Token limits of these tests: prompts have 4 tokens and responses 2 (with <eos>), so good rows fit in 8.
LIMITS = {"max_length": 8, "max_prompt_length": None}


def _msgs(role: str, content) -> list[dict]:
    return [{"role": role, "content": content}]


# (id, the bad line, reason id, field named by the error)
BAD_LINES = [
    ("invalid_json", '{"prompt": "1+1=", "chosen": "2", ', "invalid_json", None),
    ("latin1_bytes", b'{"prompt": "caf\xe9=", "chosen": "2", "rejected": "3"}', "invalid_utf8", None),
    ("not_an_object", "[1, 2, 3]", "wrong_type", None),
    ("missing_rejected", {"prompt": "1+1=", "chosen": "2"}, "missing_field", "rejected"),
    ("missing_prompt", {"chosen": "2", "rejected": "3"}, "missing_field", "prompt"),
    ("null_chosen", {"prompt": "1+1=", "chosen": None, "rejected": "3"}, "null_field", "chosen"),
    ("number_chosen", {"prompt": "1+1=", "chosen": 2, "rejected": "3"}, "wrong_type", "chosen"),
    (
        "non_string_content",
        {
            "prompt": _msgs("user", "1+1="),
            "chosen": _msgs("assistant", 2),
            "rejected": _msgs("assistant", "3"),
        },
        "wrong_type",
        "chosen[0].content",
    ),
    ("empty_chosen", {"prompt": "1+1=", "chosen": "", "rejected": "3"}, "empty_field", "chosen"),
    ("blank_rejected", {"prompt": "1+1=", "chosen": "2", "rejected": "   "}, "empty_field", "rejected"),
    (
        "empty_message_content",
        {
            "prompt": _msgs("user", "1+1="),
            "chosen": _msgs("assistant", ""),
            "rejected": _msgs("assistant", "3"),
        },
        "empty_field",
        "chosen",
    ),
    (
        "chosen_equals_rejected",
        {"prompt": "1+1=", "chosen": "2", "rejected": "2"},
        "identical_responses",
        "rejected",
    ),
    (
        "equal_after_truncation",  # 4 prompt tokens leave 4 for each response: "2222" both
        {"prompt": "1+1=", "chosen": "22222a", "rejected": "22222b"},
        "identical_after_truncation",
        "rejected",
    ),
    ("prompt_too_long", {"prompt": "1+2+3+4=", "chosen": "2", "rejected": "3"}, "prompt_too_long", "prompt"),
    (
        "unknown_role",
        {
            "prompt": _msgs("narrator", "1+1="),
            "chosen": _msgs("assistant", "2"),
            "rejected": _msgs("assistant", "3"),
        },
        "unknown_role",
        "prompt[0].role",
    ),
]
IDS = [case[0] for case in BAD_LINES]


@pytest.fixture
def no_model_load(monkeypatch):
    """Data is checked before any weights are read: loading a model fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the data is bad")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _file_with_bad_line(tmp_path: Path, write_jsonl, good_rows, bad) -> Path:
    good = good_rows(3)
    return write_jsonl(tmp_path / "train.jsonl", [good[0], good[1], bad, good[2]])


@pytest.mark.parametrize(("case", "bad", "reason", "field"), BAD_LINES, ids=IDS)
def test_error_mode_names_file_line_reason_and_fix(
    tmp_path, tokenizer, write_jsonl, good_rows, case, bad, reason, field
):
    path = _file_with_bad_line(tmp_path, write_jsonl, good_rows, bad)
    with pytest.raises(DataError) as info:
        load_preference_data(str(path), tokenizer, progress=False, **LIMITS)
    err = info.value
    assert (err.source, err.row, err.reason, err.field) == (str(path), 3, reason, field)
    message = str(err)
    assert f"{path}, line 3" in message
    assert reason in message
    assert "To fix:" in message and "on_bad_row" in message


@pytest.mark.parametrize(("case", "bad", "reason", "field"), BAD_LINES, ids=IDS)
def test_skip_mode_counts_the_line(tmp_path, tokenizer, write_jsonl, good_rows, case, bad, reason, field):
    path = _file_with_bad_line(tmp_path, write_jsonl, good_rows, bad)
    lines_written = len(path.read_bytes().splitlines())
    dataset, report = load_preference_data(str(path), tokenizer, on_bad_row="skip", progress=False, **LIMITS)
    assert report.skipped == {reason: 1}
    assert report.example_rows == {reason: [3]}
    assert report.kept == len(dataset) == 3
    assert dataset.row_numbers == [1, 2, 4]
    assert report.kept + sum(report.skipped.values()) == lines_written == report.total


def test_long_prompt_is_cut_and_counted_when_max_prompt_length_is_set(
    tmp_path, tokenizer, write_jsonl, good_rows
):
    good = good_rows(2)
    path = write_jsonl(
        tmp_path / "train.jsonl", [good[0], {"prompt": "1+2+3+4=", "chosen": "2", "rejected": "3"}, good[1]]
    )
    dataset, report = load_preference_data(
        str(path), tokenizer, max_length=8, max_prompt_length=4, progress=False
    )
    assert report.kept == 3 and report.skipped == {}
    assert report.prompts_truncated == 1
    assert dataset[1].prompt_ids == tokenizer("3+4=")["input_ids"]  # cut from the left


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_empty_file_and_missing_file_are_errors_in_both_modes(tmp_path, tokenizer, on_bad_row):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as info:
        load_preference_data(str(empty), tokenizer, on_bad_row=on_bad_row, progress=False, **LIMITS)
    assert (
        info.value.reason == "empty_file" and str(empty) in str(info.value) and "0 bytes" in str(info.value)
    )

    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        load_preference_data(str(missing), tokenizer, on_bad_row=on_bad_row, progress=False, **LIMITS)
    assert info.value.reason == "file_not_found" and str(missing) in str(info.value)


def test_skip_mode_with_no_usable_row_is_an_error(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "2"}] * 3)
    with pytest.raises(DataError) as info:
        load_preference_data(str(path), tokenizer, on_bad_row="skip", progress=False, **LIMITS)
    assert info.value.reason == "no_rows"
    assert "identical_responses" in str(info.value)  # the report is part of the message


# --- through `tether train` ------------------------------------------------------------------------------


def _cli(config: Path, *overrides: str) -> int:
    return cli.main(["train", str(config), *overrides])


@pytest.mark.parametrize(("case", "bad", "reason", "field"), BAD_LINES, ids=IDS)
def test_cli_exits_2_naming_file_line_and_reason(
    tmp_path, write_jsonl, write_config, good_rows, capsys, no_model_load, case, bad, reason, field
):
    data = _file_with_bad_line(tmp_path, write_jsonl, good_rows, bad)
    config = write_config(tmp_path / "cfg.yaml", data, tmp_path / "run", data=LIMITS)
    assert _cli(config) == 2
    err = capsys.readouterr().err
    assert err.startswith("tether train: error: ")
    assert f"{data}, line 3" in err and reason in err and "To fix:" in err
    assert "Traceback" not in err


def test_cli_skip_mode_reports_every_reason_in_data_report_json(
    tmp_path, write_jsonl, write_config, good_rows
):
    good = good_rows(4)
    lines = [good[0], good[1]] + [bad for _, bad, _, _ in BAD_LINES] + [good[2], good[3]]
    data = write_jsonl(tmp_path / "train.jsonl", lines)
    out = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", data, out, data={**LIMITS, "on_bad_row": "skip"})
    assert _cli(config, "optim.max_steps=1") == 0
    report = json.loads((out / "data_report.json").read_text())
    expected: dict[str, int] = {}
    for _, _, reason, _ in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    assert report["skipped"] == dict(sorted(expected.items()))
    assert report["kept"] == 4
    assert report["total"] == report["kept"] + sum(report["skipped"].values()) == len(lines)
    first_bad = {reason: 3 + i for i, (_, _, reason, _) in reversed(list(enumerate(BAD_LINES)))}
    assert {k: v[0] for k, v in report["example_rows"].items()} == first_bad


def test_cli_missing_data_file_exits_2(tmp_path, write_config, capsys, no_model_load):
    missing = tmp_path / "nope.jsonl"
    config = write_config(tmp_path / "cfg.yaml", missing, tmp_path / "run")
    assert _cli(config) == 2
    err = capsys.readouterr().err
    assert "data.train" in err and str(missing) in err and "does not exist" in err


def test_cli_empty_data_file_exits_2(tmp_path, write_config, capsys, no_model_load):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    config = write_config(tmp_path / "cfg.yaml", empty, tmp_path / "run")
    assert _cli(config) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "0 bytes" in err


# --- hostile rows: what Python's JSON parser or the tokenizer cannot take ---------------------------------
# Each crashed `tether train` with a traceback in both modes (ValueError "Exceeds the limit (4300 digits)",
# RecursionError, the tokenizer's TypeError). Written as raw text so that the JSON is exactly as a user's file
# holds it; the good rows around them are those of the other tests.

GOOD_LINE = '{"prompt": "1+1=", "chosen": "2", "rejected": "3"}'
HOSTILE = [
    ("5000_digit_integer", GOOD_LINE[:-1] + ', "id": ' + "7" * 5000 + "}", "number_too_long", None),
    (
        "nested_100000_levels",
        GOOD_LINE[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "nested_too_deep",
        None,
    ),
    ("nested_101_levels", GOOD_LINE[:-1] + ', "x": ' + "[" * 100 + "]" * 100 + "}", "nested_too_deep", "x"),
    (
        "lone_surrogate",
        '{"prompt": "1+1=", "chosen": "2\\ud800", "rejected": "3"}',
        "lone_surrogate",
        "chosen",
    ),
    (
        "lone_surrogate_in_message",
        '{"prompt": [{"role": "user", "content": "1+1="}], "chosen": [{"role": "assistant", "content": "\\udc00"}],'
        ' "rejected": [{"role": "assistant", "content": "3"}]}',
        "lone_surrogate",
        "chosen[0].content",
    ),
]
HOSTILE_IDS = [case[0] for case in HOSTILE]


def _hostile_file(tmp_path: Path, line: str, fmt: str) -> Path:
    lines = [GOOD_LINE, GOOD_LINE, line, GOOD_LINE]
    if fmt == "jsonl":
        path = tmp_path / "train.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:  # one JSON array, one element per line: element 3 is the hostile one
        path = tmp_path / "train.json"
        path.write_text("[\n" + ",\n".join(lines) + "\n]\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json_array"])
@pytest.mark.parametrize(("case", "line", "reason", "field"), HOSTILE, ids=HOSTILE_IDS)
def test_hostile_row_is_a_bad_row_in_both_modes(tmp_path, tokenizer, fmt, case, line, reason, field):
    path = _hostile_file(tmp_path, line, fmt)
    unit = "line" if fmt == "jsonl" else "row"
    with pytest.raises(DataError) as info:
        load_preference_data(str(path), tokenizer, progress=False, **LIMITS)
    err = info.value
    assert (err.source, err.row, err.reason, err.field) == (str(path), 3, reason, field)
    assert str(err).startswith(f"{path}, {unit} 3") and "To fix:" in str(err)
    dataset, report = load_preference_data(str(path), tokenizer, on_bad_row="skip", progress=False, **LIMITS)
    assert report.skipped == {reason: 1} and report.example_rows == {reason: [3]}
    assert dataset.row_numbers == [1, 2, 4] and report.total == 4


def test_nesting_up_to_the_limit_is_kept(tmp_path, tokenizer):
    """100 levels (the row is one) pass, so the limit is where the docs say it is."""
    path = _hostile_file(tmp_path, GOOD_LINE[:-1] + ', "x": ' + "[" * 99 + "]" * 99 + "}", "jsonl")
    dataset, report = load_preference_data(str(path), tokenizer, progress=False, **LIMITS)
    assert report.kept == len(dataset) == 4


def test_invalid_utf8_text_in_parquet_and_datasets_is_a_bad_row(tmp_path, tokenizer):
    """Arrow does not check that a string column is UTF-8: a Parquet writer or a saved dataset may hold any
    bytes there, and reading such a row raised UnicodeDecodeError for the whole batch."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    chosen = pa.array([b"2", b"2", b"\xed\xa0\x80", b"2"]).view(pa.string())  # a UTF-8-encoded surrogate
    table = pa.table({"prompt": ["1+1="] * 4, "chosen": chosen, "rejected": ["3"] * 4})
    pq.write_table(table, tmp_path / "train.parquet")
    in_memory = datasets.Dataset(table)
    in_memory.save_to_disk(str(tmp_path / "saved"))
    for source in (str(tmp_path / "train.parquet"), in_memory, str(tmp_path / "saved")):
        with pytest.raises(DataError) as info:
            load_preference_data(source, tokenizer, progress=False, **LIMITS)
        assert (info.value.row, info.value.reason, info.value.field) == (3, "invalid_utf8", "chosen")
        dataset, report = load_preference_data(source, tokenizer, on_bad_row="skip", progress=False, **LIMITS)
        assert report.skipped == {"invalid_utf8": 1} and dataset.row_numbers == [1, 2, 4]


@pytest.mark.parametrize(("case", "line", "reason", "field"), HOSTILE, ids=HOSTILE_IDS)
def test_cli_hostile_row_exits_2_or_is_counted(
    tmp_path, write_config, capsys, no_model_load, case, line, reason, field
):
    data = _hostile_file(tmp_path, line, "jsonl")
    config = write_config(tmp_path / "cfg.yaml", data, tmp_path / "run", data=LIMITS)
    assert _cli(config) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tether train: error: {data}, line 3") and reason in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_skip_mode_counts_every_hostile_row(tmp_path, write_config):
    lines = [GOOD_LINE, GOOD_LINE, *(line for _, line, _, _ in HOSTILE), GOOD_LINE, GOOD_LINE]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", data, out, data={**LIMITS, "on_bad_row": "skip"})
    assert _cli(config, "optim.max_steps=1") == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["skipped"] == {"lone_surrogate": 2, "nested_too_deep": 2, "number_too_long": 1}
    assert report["example_rows"] == {
        "lone_surrogate": [6, 7],
        "nested_too_deep": [4, 5],
        "number_too_long": [3],
    }
    assert report["kept"] == 4 and report["total"] == len(lines)


@pytest.mark.parametrize(
    ("line", "reason"),
    [(line, reason) for _, line, reason, _ in HOSTILE[:-1]] + [(b'{"prompt": "caf\xe9"}', "invalid_utf8")],
    ids=[*HOSTILE_IDS[:-1], "latin1_bytes"],
)
def test_eval_prompt_file_hostile_line_exits_2(tmp_path, model_dir, capsys, line, reason):
    """`tether eval` reads its prompt file with the same checks and stops before loading a model."""
    prompts = tmp_path / "prompts.jsonl"
    if isinstance(line, str):
        line = line.replace('"chosen"', '"answer"').encode("utf-8")
    prompts.write_bytes(b'{"prompt": "1+1="}\n' + line + b"\n")
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"models: [{{name: m, path: {model_dir}}}]\nprompts: {prompts}\noutput_dir: {tmp_path / 'out'}\n"
    )
    assert cli.main(["eval", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tether eval: prompts: {prompts} line 2") and reason in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
