"""Tests for tether.data: sources, row checks (every reason id), tokenization, truncation, collation, report.

The tokenizer is built here: a word-level tokenizer over whitespace (one token per word, so lengths are easy to
count by hand) whose post-processor prepends <s> like Llama's, with eos </s>, and a Jinja chat template that
writes <s>, a role marker before each turn, </s> after each assistant turn, and raises (as Llama 2's template
does) when two user or two assistant turns follow each other. Ids: <pad>=0 <s>=1 </s>=2 <unk>=3, role
markers 4..7, then WORDS in order from 8. Its normalizer deletes "~", so "~" alone tokenizes to nothing.
"""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tether.batch import IGNORE_INDEX
from tether.data import (
    BAD_ROW_REASONS,
    DataError,
    DataReport,
    PreferenceCollator,
    PreferenceDataset,
    TokenizedPair,
    load_preference_data,
    load_rows,
    parse_row,
    split_implicit_prompt,
    tokenize_example,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
WORDS = "the sky is blue green red what color ? . be brief a b c d e f g h i j yes no".split()
ID = {w: i for i, w in enumerate(SPECIALS + WORDS)}
BOS, EOS, PAD = ID["<s>"], ID["</s>"], ID["<pad>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if loop.index0 > 0 and m['role'] in ['user', 'assistant'] and messages[loop.index0 - 1]['role'] == m['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    "{% endif %}"
    "{{ '<|' + m['role'] + '|> ' + (m['content'] or '') + ' ' }}"
    "{% if m['role'] == 'assistant' %}{{ '</s> ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def make_tokenizer(*, eos: bool = True, chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(vocab=dict(ID), unk_token="<unk>"))
    backend.normalizer = normalizers.Replace("~", "")
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>" if eos else None,
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=chat_template,
    )


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


STANDARD = {"prompt": "the sky is", "chosen": " blue", "rejected": " green ."}
CONVERSATIONAL = {
    "prompt": [{"role": "system", "content": "be brief"}, user("what color is the sky ?")],
    "chosen": [assistant("blue")],
    "rejected": [assistant("green")],
}
# Hand-derived ids of the two rows above under `tok`.
STANDARD_IDS = (ids("<s> the sky is"), ids("blue </s>"), ids("green . </s>"))
CONVERSATIONAL_IDS = (
    ids("<s> <|system|> be brief <|user|> what color is the sky ? <|assistant|>"),
    ids("blue </s>"),
    ids("green </s>"),
)


def write_jsonl(path, lines) -> None:
    """Each item: a dict (dumped as JSON), a str (written as is) or bytes (written raw), one per line."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")


def load(source, tokenizer, **kwargs):
    kwargs = {"max_length": None, "max_prompt_length": None, "progress": False, **kwargs}
    return load_preference_data(source, tokenizer, **kwargs)


def as_tuples(dataset: PreferenceDataset) -> list[tuple]:
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in dataset]


# ---------------------------------------------------------------------------------------------- sources


def test_jsonl_standard_and_conversational_rows_tokenize_to_hand_derived_ids(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [STANDARD, "", CONVERSATIONAL])  # a blank line is not a row but keeps its number
    dataset, report = load(path, tok)
    assert as_tuples(dataset) == [STANDARD_IDS, CONVERSATIONAL_IDS]
    assert dataset.row_numbers == [1, 3]
    assert (report.total, report.kept, report.skipped) == (2, 2, {})


def test_every_file_format_gives_the_same_pairs(tmp_path, tok):
    rows = [STANDARD, {"prompt": "what color ?", "chosen": " red", "rejected": " no"}]
    expected = [STANDARD_IDS, (ids("<s> what color ?"), ids("red </s>"), ids("no </s>"))]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows, indent=2))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "d.csv").write_text(
        "prompt,chosen,rejected\n"
        + "".join(f'"{r["prompt"]}","{r["chosen"]}","{r["rejected"]}"\n' for r in rows)
    )
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "e"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(tmp_path / "f"))
    for name in ["a.jsonl", "b.json", "c.parquet", "d.csv", "e"]:
        dataset, report = load(tmp_path / name, tok)
        assert as_tuples(dataset) == expected, name
        assert dataset.row_numbers == [1, 2], name
        assert report.unit == ("line" if name == "a.jsonl" else "row")
    dataset, _ = load(tmp_path / "f", tok, split="test")
    assert as_tuples(dataset) == expected
    dataset, _ = load(tmp_path / "f", tok)  # default split "train"
    assert as_tuples(dataset) == expected[:1]
    dataset, _ = load(datasets.Dataset.from_list(rows), tok)  # in memory
    assert as_tuples(dataset) == expected


def test_progress_bar_reports_rows_and_changes_nothing(tmp_path, tok, capsys):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [STANDARD, CONVERSATIONAL])
    quiet, _ = load(path, tok)
    shown, _ = load(path, tok, progress=True)
    assert as_tuples(shown) == as_tuples(quiet)
    assert f"Reading {path}" in capsys.readouterr().err


def test_conversational_parquet_and_saved_dataset(tmp_path, tok):
    pq.write_table(pa.Table.from_pylist([CONVERSATIONAL]), tmp_path / "c.parquet")
    datasets.Dataset.from_list([CONVERSATIONAL]).save_to_disk(str(tmp_path / "ds"))
    for source in (tmp_path / "c.parquet", tmp_path / "ds"):
        dataset, _ = load(source, tok)
        assert as_tuples(dataset) == [CONVERSATIONAL_IDS]


def test_load_rows_yields_line_numbers_and_bad_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    write_jsonl(path, [{"a": 1}, "", "{oops", b"\xff\xfe"])
    rows = list(load_rows(path))
    assert [n for n, _ in rows] == [1, 3, 4]
    assert rows[0][1] == {"a": 1}
    assert [r.reason for _, r in rows[1:]] == ["invalid_json", "invalid_utf8"]


@pytest.mark.parametrize(
    ("name", "content", "reason", "fragment"),
    [
        ("missing.jsonl", None, "file_not_found", "file not found"),
        ("empty.jsonl", b"", "empty_file", "empty (0 bytes)"),
        ("x.txt", b"hi", "unknown_format", "unknown file type '.txt'"),
        ("bad.parquet", b"no", "unreadable_file", "not a readable Parquet"),
        ("folder", "dir", "unreadable_file", "save_to_disk"),
    ],
)
def test_file_level_errors_are_raised_in_both_modes(tmp_path, tok, name, content, reason, fragment):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as info:
            load(path, tok, on_bad_row=mode)
        assert info.value.reason == reason
        assert str(path) in str(info.value) and fragment in str(info.value)


def test_missing_split_names_the_available_ones(tmp_path, tok):
    datasets.DatasetDict({"train": datasets.Dataset.from_list([STANDARD])}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"no split 'test'; the dataset has \['train'\]"):
        load(tmp_path / "d", tok, split="test")


def test_source_with_no_usable_rows_is_an_error_even_when_skipping(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, ["{", "{"])
    with pytest.raises(DataError, match="has no usable rows") as info:
        load(path, tok, on_bad_row="skip")
    assert "invalid_json" in str(info.value) and "2" in str(info.value)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="has no rows"):
        load(tmp_path / "blank.jsonl", tok)


# ------------------------------------------------------------------------------------------ bad rows

GOOD = {"prompt": "a", "chosen": " yes", "rejected": " no"}
# (first line of the file, reason, field named in the error, load kwargs, tokenizer kwargs)
BAD_ROWS = [
    ("{not json", "invalid_json", None, {}, {}),
    (b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}', "invalid_utf8", None, {}, {}),
    (
        '{"prompt": "a", "chosen": "b", "rejected": "c", "n": 1' + "0" * 4300 + "}",
        "number_too_long",
        None,
        {},
        {},
    ),
    (
        '{"prompt": "a", "chosen": "b", "rejected": "c", "n": ' + "[" * 3000 + "]" * 3000 + "}",
        "nested_too_deep",
        None,
        {},
        {},
    ),
    (
        '{"prompt": "a", "chosen": "b", "rejected": "c", "n": '
        + "[" * 100
        + "]" * 100
        + "}",  # the row is level 1
        "nested_too_deep",
        "n",
        {},
        {},
    ),
    ({"prompt": "a", "chosen": "b\udfff", "rejected": "c"}, "lone_surrogate", "chosen", {}, {}),
    (
        {"prompt": "a", "chosen": "b", "rejected": "c", "meta": {"\ud800": 1}},
        "lone_surrogate",
        "meta",
        {},
        {},
    ),
    ({"prompt": "a", "chosen": "b"}, "missing_field", "rejected", {}, {}),
    ({"prompt": "a", "chosen": None, "rejected": "b"}, "null_field", "chosen", {}, {}),
    ({"prompt": "a", "chosen": {"text": "b"}, "rejected": "c"}, "wrong_type", "chosen", {}, {}),
    ({"prompt": [user("a")], "chosen": "b", "rejected": "c"}, "wrong_type", "chosen", {}, {}),
    (
        {
            "prompt": [user("a")],
            "chosen": [{"role": "assistant", "content": ["b"]}],
            "rejected": [assistant("c")],
        },
        "wrong_type",
        "chosen[0].content",
        {},
        {},
    ),
    ({"prompt": "  ", "chosen": "b", "rejected": "c"}, "empty_field", "prompt", {}, {}),
    ({"prompt": [user("a")], "chosen": [], "rejected": [assistant("c")]}, "empty_field", "chosen", {}, {}),
    (
        {
            "prompt": [{"role": "narrator", "content": "a"}],
            "chosen": [assistant("b")],
            "rejected": [assistant("c")],
        },
        "unknown_role",
        "prompt[0].role",
        {},
        {},
    ),
    ({"prompt": "a", "chosen": " b", "rejected": " b"}, "identical_responses", "rejected", {}, {}),
    (
        {"prompt": [user("a"), user("b")], "chosen": [assistant("c")], "rejected": [assistant("d")]},
        "template_error",
        "prompt",
        {},
        {},
    ),
    (
        {
            "prompt": [user("a")],
            "chosen": [assistant("b")],
            "rejected": [assistant("c")],
            "chat_template_kwargs": {"return_tensors": "pt"},  # apply_chat_template's own argument
        },
        "template_error",
        "prompt",
        {},
        {},
    ),
    ({"prompt": "the sky is bl", "chosen": "ue", "rejected": "ack"}, "prompt_not_prefix", "chosen", {}, {}),
    (
        {"prompt": "a b c", "chosen": " d", "rejected": " e"},
        "prompt_too_long",
        "prompt",
        {"max_length": 4},
        {},
    ),
    (
        {"prompt": "a", "chosen": "~", "rejected": " b"},
        "empty_response_after_truncation",
        "chosen",
        {},
        {"eos": False},
    ),
    (
        {"prompt": "a", "chosen": " b c d", "rejected": " b c e"},
        "identical_after_truncation",
        "rejected",
        {"max_length": 4},
        {},
    ),
]


def test_bad_row_table_covers_every_reason():
    assert {reason for _, reason, *_ in BAD_ROWS} == set(BAD_ROW_REASONS)


@pytest.mark.parametrize(
    ("line", "reason", "field", "kwargs", "tok_kwargs"),
    BAD_ROWS,
    ids=[r[1] + f"-{i}" for i, r in enumerate(BAD_ROWS)],
)
def test_bad_row_error_mode_names_file_line_field_reason_and_fix(
    tmp_path, line, reason, field, kwargs, tok_kwargs
):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [GOOD, "", line, GOOD])
    with pytest.raises(DataError) as info:
        load(path, make_tokenizer(**tok_kwargs), **kwargs)
    message = str(info.value)
    where = f"{path}, line 3" + (f", field {field!r}" if field else "")
    assert message.startswith(f"{where}: {reason}: "), message
    assert "To fix: " in message and "data.on_bad_row=skip" in message
    assert (info.value.row, info.value.field, info.value.reason) == (3, field, reason)


@pytest.mark.parametrize(
    ("line", "reason", "field", "kwargs", "tok_kwargs"),
    BAD_ROWS,
    ids=[r[1] + f"-{i}" for i, r in enumerate(BAD_ROWS)],
)
def test_bad_row_skip_mode_counts_exactly_one(tmp_path, line, reason, field, kwargs, tok_kwargs):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [GOOD, line, line, GOOD])
    dataset, report = load(path, make_tokenizer(**tok_kwargs), on_bad_row="skip", **kwargs)
    assert report.skipped == {reason: 2}
    assert report.example_rows == {reason: [2, 3]}
    assert (report.total, report.kept, len(dataset)) == (4, 2, 2)
    assert dataset.row_numbers == [1, 4]


def test_skip_mode_counts_many_reasons_and_the_invariant_holds(tmp_path, tok):
    lines = [
        GOOD,
        "{",
        {"prompt": "a", "chosen": "b"},
        {"prompt": "a", "chosen": " b", "rejected": " b"},
        GOOD,
        "[1]",
    ]
    path = tmp_path / "t.jsonl"
    write_jsonl(path, lines)
    _, report = load(path, tok, on_bad_row="skip")
    assert report.skipped == {
        "invalid_json": 1,
        "missing_field": 1,
        "identical_responses": 1,
        "wrong_type": 1,
    }
    assert report.kept == 2 and report.total == 6 == report.kept + sum(report.skipped.values())


def test_csv_and_parquet_errors_name_the_row(tmp_path, tok):
    (tmp_path / "t.csv").write_bytes(b"prompt,chosen,rejected\na, b, c\na,\xff, c\n")
    with pytest.raises(DataError, match=r"t.csv, row 2, field 'chosen': invalid_utf8: "):
        load(tmp_path / "t.csv", tok)
    pq.write_table(
        pa.Table.from_pylist([GOOD, {"prompt": "a", "chosen": None, "rejected": "c"}]), tmp_path / "t.parquet"
    )
    with pytest.raises(DataError, match=r"t.parquet, row 2, field 'chosen': null_field: "):
        load(tmp_path / "t.parquet", tok)


def test_missing_prompt_is_missing_field_when_the_first_row_has_one(tmp_path, tok):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [GOOD, {"chosen": "the sky is blue", "rejected": "the sky is red"}])
    with pytest.raises(DataError, match=r"line 2, field 'prompt': missing_field"):
        load(path, tok)


def test_conversational_rows_need_a_chat_template(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [CONVERSATIONAL])
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match="no chat template") as info:
            load(path, make_tokenizer(chat_template=None), on_bad_row=mode)
        assert info.value.reason == "no_chat_template"


def test_conversational_template_that_renders_the_prompt_differently_is_prompt_not_prefix(tmp_path):
    # The generation prompt opens with a marker the full conversation does not have.
    template = CHAT_TEMPLATE.replace("{{ '<|assistant|> ' }}", "{{ '<|tool|> <|assistant|> ' }}")
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [CONVERSATIONAL])
    with pytest.raises(
        DataError, match=r"field 'chosen': prompt_not_prefix: .*from token 11 the prompt alone reads"
    ):
        load(path, make_tokenizer(chat_template=template))


def test_invalid_arguments_raise_value_error(tmp_path, tok):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [GOOD])
    with pytest.raises(ValueError, match="on_bad_row"):
        load(path, tok, on_bad_row="ignore")
    with pytest.raises(ValueError, match="max_prompt_length"):
        load(path, tok, max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="max_length"):
        load(path, tok, max_length=0)


# ------------------------------------------------------------------------------------ formats & tokenizing


def test_standard_eos_is_appended_once_and_not_without_an_eos_token(tok):
    with_eos = parse_row({"prompt": "a", "chosen": " b</s>", "rejected": " c"})
    assert tokenize_example(with_eos, tok) == (ids("<s> a"), ids("b </s>"), ids("c </s>"))
    no_eos = parse_row({"prompt": "a", "chosen": " b", "rejected": " c"})
    assert tokenize_example(no_eos, make_tokenizer(eos=False)) == (ids("<s> a"), ids("b"), ids("c"))


def test_multi_turn_conversation_and_tool_call_without_content(tok):
    row = {
        "prompt": [user("what color ?"), assistant("blue"), user("is the sky red ?")],
        "chosen": [assistant("no")],
        "rejected": [
            {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
            {"role": "tool", "content": "yes"},
        ],
    }
    example = parse_row(row)
    prompt, chosen, rejected = tokenize_example(example, tok)
    assert prompt == ids(
        "<s> <|user|> what color ? <|assistant|> blue </s> <|user|> is the sky red ? <|assistant|>"
    )
    assert chosen == ids("no </s>")
    assert rejected[-2:] == ids("<|tool|> yes")


def test_implicit_prompt_conversational_and_standard(tmp_path, tok):
    conv = {
        "chosen": [user("what color ?"), assistant("blue")],
        "rejected": [user("what color ?"), assistant("red")],
    }
    text = {"chosen": "the sky is blue", "rejected": "the sky is green"}
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [conv, text])
    dataset, _ = load(path, tok)
    assert as_tuples(dataset) == [
        (ids("<s> <|user|> what color ? <|assistant|>"), ids("blue </s>"), ids("red </s>")),
        (ids("<s> the sky is"), ids("blue </s>"), ids("green </s>")),
    ]
    assert split_implicit_prompt("the sky is blue", "the sky is green") == ("the sky is", " blue", " green")
    assert split_implicit_prompt("a b", "a b c") == ("a ", "b", "b c")  # one is a prefix: keep an item each
    bad = parse_row({"chosen": "blue", "rejected": "red"}, implicit_prompt=True)
    assert (bad.reason, bad.field) == ("empty_field", "prompt")


def test_tools_column_must_be_json_list(tok):
    row = {**CONVERSATIONAL, "tools": "[not json"}
    assert parse_row(row).reason == "invalid_json"
    assert parse_row({**CONVERSATIONAL, "tools": 3}).reason == "wrong_type"
    assert parse_row({**CONVERSATIONAL, "tools": '[{"name": "f"}]'}).tools == [{"name": "f"}]


# ---------------------------------------------------------------------------------------------- truncation


def test_prompt_is_cut_from_the_left_and_responses_from_the_right(tmp_path, tok):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"prompt": "a b c d e", "chosen": " f g h i", "rejected": " j"}, STANDARD])
    dataset, report = load(path, tok, max_prompt_length=3, max_length=6)
    first = dataset[0]
    assert first.prompt_ids == ids("c d e")  # the end of the prompt survives (<s> a b are cut)
    assert first.chosen_ids == ids("f g h")  # the start of the response survives
    assert first.rejected_ids == ids("j </s>")  # short enough: untouched
    assert dataset[1].prompt_ids == ids("the sky is")  # "<s> the sky is" is 4 tokens: <s> is cut
    assert (report.prompts_truncated, report.responses_truncated) == (2, 1)


def test_truncation_keeps_every_sequence_within_max_length(tmp_path, tok):
    rows = [
        {"prompt": " ".join("abcdefghij"[: k + 1]), "chosen": " yes no yes", "rejected": " no"}
        for k in range(10)
    ]
    path = tmp_path / "t.jsonl"
    write_jsonl(path, rows)
    dataset, report = load(path, tok, max_length=7, on_bad_row="skip")
    for pair in dataset:
        assert len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) <= 7
        assert pair.chosen_ids == ids("yes no yes </s>")[: 7 - len(pair.prompt_ids)]
    assert report.skipped == {"prompt_too_long": 5}  # prompts of 7..11 tokens (<s> + 6..10 letters)


# ---------------------------------------------------------------------------------------------- collation


def test_collator_layout_chosen_rows_first_labels_on_responses_only():
    pairs = [TokenizedPair([1, 10, 11], [20, 21], [30], 1), TokenizedPair([1, 12], [22], [31, 32, 33], 2)]
    batch = PreferenceCollator(pad_token_id=2)(pairs)
    X = IGNORE_INDEX
    assert batch.input_ids.tolist() == [
        [1, 10, 11, 20, 21],
        [1, 12, 22, 2, 2],
        [1, 10, 11, 30, 2],
        [1, 12, 31, 32, 33],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert batch.labels.tolist() == [
        [X, X, X, 20, 21],
        [X, X, 22, X, X],
        [X, X, X, 30, X],
        [X, X, 31, 32, 33],
    ]
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.labels.dtype == torch.long
    assert batch.num_pairs == 2 and batch.num_response_tokens() == 7


def test_collator_with_eos_as_pad_keeps_real_eos_labelled():
    batch = PreferenceCollator(pad_token_id=EOS)([TokenizedPair([BOS, 8], [9, EOS], [10, 11, EOS], 1)])
    assert batch.input_ids[0].tolist() == [BOS, 8, 9, EOS, EOS]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 0]
    assert batch.labels[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 9, EOS, IGNORE_INDEX]


def test_collator_rejects_bad_pad_and_empty_batch():
    with pytest.raises(TypeError, match="eos_token_id"):
        PreferenceCollator(pad_token_id=None)
    with pytest.raises(ValueError, match="empty"):
        PreferenceCollator(0)([])


def test_dataset_indexing_pickling_and_lengths():
    pairs = [TokenizedPair([1, 2], [3], [4, 5, 6], 7), TokenizedPair([1], [8, 9], [10], 9)]
    dataset = PreferenceDataset(pairs)
    assert len(dataset) == 2 and dataset[0] == pairs[0] and dataset[-1] == pairs[1]
    assert dataset.lengths() == [5, 3] and dataset.row_numbers == [7, 9]
    assert list(pickle.loads(pickle.dumps(dataset))) == pairs
    with pytest.raises(IndexError):
        dataset[2]


# -------------------------------------------------------------------------------------------------- report


def test_report_round_trips_and_formats(tmp_path):
    report = DataReport(source="t.jsonl", unit="line", kept=5)
    for row in (2, 4, 6, 8, 10, 12):
        report.add_skip("invalid_json", row)
    report.add_skip("identical_responses", 3)
    assert report.total == 12 and report.example_rows["invalid_json"] == [2, 4, 6, 8, 10]
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["total"] == 12 and data["skipped"] == {"identical_responses": 1, "invalid_json": 6}
    assert DataReport.from_dict(data) == report
    assert report.format_table() == (
        "data: t.jsonl\n"
        "  rows read              12\n"
        "  kept                    5\n"
        "  skipped                 7\n"
        "    invalid_json          6  (lines 2, 4, 6, 8, 10, ...)\n"
        "    identical_responses   1  (line 3)\n"
        "  prompts truncated       0\n"
        "  responses truncated     0"
    )


# ----------------------------------------------------------------------------------------- parity with TRL


def trl_tokenize(rows: list[dict], tokenizer) -> list[tuple]:
    """TRL 1.16's own preprocessing: `DPOTrainer._prepare_dataset` (extract prompt, add eos, tokenize) called
    unbound with the two attributes it reads, so the code under comparison is TRL's, not a copy."""
    from trl.trainer.dpo_trainer import DPOTrainer

    stub = SimpleNamespace(_tokenizer=tokenizer)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    out = DPOTrainer._prepare_dataset(stub, datasets.Dataset.from_list(rows), tokenizer, args, "parity")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in out]


PARITY_SETS = {
    "standard": [
        STANDARD,
        {"prompt": "what color is the sky ?", "chosen": " blue .</s>", "rejected": " red"},
        {"prompt": "a", "chosen": " unknown words here", "rejected": " b c"},
    ],
    "conversational": [
        CONVERSATIONAL,
        {
            "prompt": [user("a"), assistant("b"), user("c")],
            "chosen": [assistant("d")],
            "rejected": [assistant("e f")],
        },
    ],
    "implicit_conversational": [
        {
            "chosen": [user("what color ?"), assistant("blue")],
            "rejected": [user("what color ?"), assistant("red")],
        },
    ],
    "implicit_standard": [{"chosen": "the sky is blue", "rejected": "the sky is green ."}],
}


@pytest.mark.parametrize("name", list(PARITY_SETS))
def test_token_ids_equal_trl_dpo_tokenization(tmp_path, tok, name):
    pytest.importorskip("trl")
    rows = PARITY_SETS[name]
    path = tmp_path / "t.jsonl"
    write_jsonl(path, rows)
    ours, _ = load(path, tok)
    assert as_tuples(ours) == trl_tokenize(rows, tok)
