"""Tokenizing preference examples as TRL 1.16's DPOTrainer does, and truncating them by a stated policy.

Tokenization (the same ids as `DPOTrainer._prepare_dataset` for every row we keep):
  - standard rows: the tokenizer's eos token text is appended to chosen and rejected unless they already end
    with it (nothing is appended when the tokenizer has no eos token; TRL requires one). Then
    `tokenizer(prompt)`, `tokenizer(prompt + chosen)` and `tokenizer(prompt + rejected)` are tokenized with the
    tokenizer's own special tokens (e.g. a bos its post-processor adds).
  - conversational rows: `apply_chat_template(prompt, add_generation_prompt=True)`,
    `apply_chat_template(prompt + chosen)` and `apply_chat_template(prompt + rejected)`, with the row's
    `tools` and `chat_template_kwargs`. Whatever eos the template writes belongs to the response.
  The response ids are what each full sequence adds after the prompt ids. The prompt ids must be a prefix of
  both full sequences; where they are not (a template that renders the prompt alone differently, or text
  tokens that merge across the prompt/response boundary) the row is `prompt_not_prefix`. TRL instead cuts
  the prompt back to the common prefix and warns once; we refuse, because the model would be trained on a
  context it never sees at inference.

Truncation (`truncate_pair`), in this order:
  1. max_prompt_length: a longer prompt keeps its last max_prompt_length tokens (cut from the LEFT, so the
     end of the conversation, next to the response, survives; a leading bos or system prompt may be cut).
  2. max_length: a prompt of max_length tokens or more leaves no room for a response: `prompt_too_long`.
     Otherwise each response keeps its first max_length - len(prompt) tokens (cut from the RIGHT), chosen
     and rejected independently, so each of prompt+chosen and prompt+rejected fits in max_length.
  3. A response with no tokens left is `empty_response_after_truncation`; equal chosen and rejected ids are
     `identical_after_truncation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tether.data.errors import (
    EMPTY_FIELD,
    EMPTY_RESPONSE_AFTER_TRUNCATION,
    IDENTICAL_AFTER_TRUNCATION,
    PROMPT_NOT_PREFIX,
    PROMPT_TOO_LONG,
    TEMPLATE_ERROR,
    BadRow,
)
from tether.data.rows import PreferenceExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TokenIds = tuple[list[int], list[int], list[int]]
_SHOWN_TOKENS = 8  # tokens decoded into a prompt_not_prefix message


def check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    """Raise ValueError for limits that no row could satisfy (None means no limit)."""
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length}), or a prompt cut "
            "to max_prompt_length leaves no room for a response"
        )


def tokenize_example(example: PreferenceExample, tokenizer: PreTrainedTokenizerBase) -> TokenIds | BadRow:
    """(prompt_ids, chosen_ids, rejected_ids) for one example, untruncated, as TRL tokenizes it."""
    return tokenize_examples([example], tokenizer)[0]


def tokenize_examples(
    examples: Sequence[PreferenceExample], tokenizer: PreTrainedTokenizerBase
) -> list[TokenIds | BadRow]:
    """`tokenize_example` over many examples; standard rows go through the tokenizer in one batched call."""
    results: list[TokenIds | BadRow | None] = [None] * len(examples)
    standard = [i for i, example in enumerate(examples) if not example.conversational]
    if standard:
        eos = tokenizer.eos_token
        texts: list[str] = []
        for i in standard:
            example = examples[i]
            texts.append(example.prompt)
            texts.append(example.prompt + _with_eos(example.chosen, eos))
            texts.append(example.prompt + _with_eos(example.rejected, eos))
        ids = tokenizer(text=texts)["input_ids"]
        for k, i in enumerate(standard):
            results[i] = _split_responses(ids[3 * k], ids[3 * k + 1], ids[3 * k + 2], tokenizer)
    for i, example in enumerate(examples):
        if example.conversational:
            results[i] = _tokenize_conversation(example, tokenizer)
    return results  # type: ignore[return-value]  # every slot is filled above


def _with_eos(text: str, eos: str | None) -> str:
    return text if eos is None or text.endswith(eos) else text + eos


def _tokenize_conversation(
    example: PreferenceExample, tokenizer: PreTrainedTokenizerBase
) -> TokenIds | BadRow:
    kwargs: dict[str, Any] = {"tools": example.tools, **example.chat_template_kwargs}
    calls = (
        ("prompt", example.prompt, True),
        ("chosen", example.prompt + example.chosen, False),
        ("rejected", example.prompt + example.rejected, False),
    )
    ids = []
    for name, messages, generation_prompt in calls:
        try:
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt, **kwargs
            )
            out = list(out["input_ids"])
        except Exception as exc:  # the template is user code (raise_exception, missing keys, ...)
            return BadRow(TEMPLATE_ERROR, name, f"{type(exc).__name__}: {exc}")
        if not all(isinstance(i, int) for i in out):  # e.g. chat_template_kwargs {"return_tensors": "pt"}
            return BadRow(
                TEMPLATE_ERROR,
                name,
                "apply_chat_template returned no list of token ids; chat_template_kwargs must not set its "
                "own arguments (tokenize, return_dict, return_tensors, ...)",
            )
        ids.append(out)
    return _split_responses(ids[0], ids[1], ids[2], tokenizer)


def _split_responses(
    prompt_ids: list[int],
    chosen_full: list[int],
    rejected_full: list[int],
    tokenizer: PreTrainedTokenizerBase,
) -> TokenIds | BadRow:
    n = len(prompt_ids)
    if n == 0:
        return BadRow(EMPTY_FIELD, "prompt", "the prompt tokenizes to no tokens")
    for name, full in (("chosen", chosen_full), ("rejected", rejected_full)):
        if full[:n] != prompt_ids:
            k = next((i for i, (a, b) in enumerate(zip(prompt_ids, full)) if a != b), min(n, len(full)))
            alone = tokenizer.decode(prompt_ids[k : k + _SHOWN_TOKENS])
            joined = tokenizer.decode(full[k : k + _SHOWN_TOKENS])
            return BadRow(
                PROMPT_NOT_PREFIX,
                name,
                f"the tokenized prompt is not a prefix of the tokenized prompt+{name}: from token {k} the "
                f"prompt alone reads {alone!r} but prompt+{name} reads {joined!r}",
            )
    return list(prompt_ids), list(chosen_full[n:]), list(rejected_full[n:])


@dataclass(frozen=True)
class Truncated:
    """Token ids after truncation, and whether the prompt / either response was cut."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool
    response_truncated: bool


def truncate_pair(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
) -> Truncated | BadRow:
    """Apply the truncation policy of the module docstring; None limits do nothing."""
    prompt_truncated = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        prompt_ids = prompt_ids[-max_prompt_length:]
    response_truncated = False
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room <= 0:
            return BadRow(
                PROMPT_TOO_LONG,
                "prompt",
                f"the prompt has {len(prompt_ids)} tokens, leaving no room for a response within "
                f"max_length={max_length}",
            )
        response_truncated = len(chosen_ids) > room or len(rejected_ids) > room
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        if not ids:
            return BadRow(EMPTY_RESPONSE_AFTER_TRUNCATION, name, f"{name!r} has no tokens")
    if chosen_ids == rejected_ids:
        limit = f" within max_length={max_length}" if response_truncated else ""
        return BadRow(
            IDENTICAL_AFTER_TRUNCATION,
            "rejected",
            f"'chosen' and 'rejected' are the same {len(chosen_ids)} tokens{limit}",
        )
    return Truncated(
        list(prompt_ids), list(chosen_ids), list(rejected_ids), prompt_truncated, response_truncated
    )
