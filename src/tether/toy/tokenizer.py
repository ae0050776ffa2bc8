"""A character-level tokenizer for the toy world, built in code (nothing is downloaded).

Every character of `ALPHABET` is one token; anything else encodes to `<unk>`. Special tokens (`<pad>`,
`<bos>`, `<eos>`, `<unk>`) and role markers (`<|system|>`, `<|user|>`, `<|assistant|>`) are single tokens.
Plain `tokenizer(text)` adds no special tokens: the chat template is the one place that writes `<bos>` and
the role markers, and it closes every assistant turn with `<eos>`, so

    prompt text     = "<bos><|user|>12+7=<|assistant|>"          (add_generation_prompt=True)
    prompt + answer = "<bos><|user|>12+7=<|assistant|>19<eos>"

and the templated prompt is always a prefix of the templated conversation. For any string `s` over
`ALPHABET`, `decode(encode(s)) == s` (a fusing decoder; no spaces between characters, no clean-up).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_MARKERS)

# Longest sequence (prompt + completion, in tokens) the toy world is built for; the tiny model's
# `max_position_embeddings` defaults to it.
MODEL_MAX_LENGTH = 256

# Characters the toy tasks write, one token each.
ALPHABET = string.digits + string.ascii_lowercase + " +-*=.,!?'"

# Jinja chat template: <bos>, then each turn as <|role|>content (assistant turns end with <eos>), then
# <|assistant|> when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('toy chat template: unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer: special tokens get ids 0..6 in `SPECIAL_TOKENS` order, then `ALPHABET` in order.

    Returns a `PreTrainedTokenizerFast` with pad/bos/eos/unk set, right padding, `model_max_length =
    MODEL_MAX_LENGTH`, and `CHAT_TEMPLATE`. Its vocabulary has `len(SPECIAL_TOKENS) + len(ALPHABET)` = 53 tokens.
    """
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *ALPHABET))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split into single characters (newlines included, so they map to <unk> rather than vanishing).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=list(ROLE_MARKERS),
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
