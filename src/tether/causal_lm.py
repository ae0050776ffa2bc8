"""What tether reads from a causal LM: its final hidden states, through its own forward, and its output head
(weight, bias and the logit transform its config names).

Below both `tether.modeling` (loading, the load-time probe, the policy's statistics) and `tether.reference`
(the reference's statistics), which read a model the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from tether.batch import PreferenceBatch
from tether.heads import HeadTransform


class UnsupportedModelError(ValueError):
    """The model's logits are not what tether's chunked head computes from its final hidden states."""


# How a family's ForCausalLM.forward scales W h + b, read from its modeling file in transformers:
# model_type -> (config field, "multiply" | "divide").
LOGIT_SCALES: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa"),
        ("logits_scaling", "divide"),  # logits = logits / config.logits_scaling
    ),
    # lm_head(h / config.logits_scaling), a property: hidden_size / dim_model_base (equal: lm_head has no bias)
    "minicpm3": ("logits_scaling", "divide"),
    **dict.fromkeys(
        ("cohere", "cohere2", "cohere2_moe"), ("logit_scale", "multiply")
    ),  # logits = logits * config.logit_scale
    "falcon_h1": ("lm_head_multiplier", "multiply"),  # lm_head(h) * config.lm_head_multiplier
    "hyperclovax": ("logits_scaling", "multiply"),  # the name Granite divides by, multiplied
}
# Soft-capping, after any scale: logits = cap * tanh(logits / cap). Gemma-2, Gemma-3 and every other
# transformers model that has it name the cap `final_logit_softcapping`; RecurrentGemma `logits_soft_cap`.
SOFTCAP_FIELDS: dict[str, str] = {"recurrent_gemma": "logits_soft_cap"}
DEFAULT_SOFTCAP_FIELD = "final_logit_softcapping"


def text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    return cfg


def head_transform(model: nn.Module) -> HeadTransform:
    """What the model does to W h + b before its logits, from its config (`LOGIT_SCALES`, `SOFTCAP_FIELDS`).

    Works on a causal LM or a PEFT model of one. A family not in `LOGIT_SCALES` gets scale 1; the load-time
    probe (`check_head_matches_logits`) refuses it if its logits are scaled after all.
    """
    cfg = text_config(model)
    model_type = getattr(cfg, "model_type", None)
    scale, cap = 1.0, None
    if model_type in LOGIT_SCALES:
        field, how = LOGIT_SCALES[model_type]
        value = getattr(cfg, field, None)
        if value is not None:
            scale = 1.0 / float(value) if how == "divide" else float(value)
    cap_field = SOFTCAP_FIELDS.get(model_type, DEFAULT_SOFTCAP_FIELD)
    value = getattr(cfg, cap_field, None)
    if value:  # None or 0: no capping (the models test `is not None`; a cap of 0 would divide by zero)
        cap = float(value)
    try:
        return HeadTransform(scale=scale, softcap=cap)
    except ValueError as err:
        raise UnsupportedModelError(f"{type(model).__name__} ({model_type}): {err}") from None


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, HeadTransform]:
    """(weight (V, H), bias (V,) or None, transform) of the model's output head (unwrap DDP/PEFT first)."""
    head = model.get_output_embeddings()
    return head.weight, head.bias, head_transform(model)


# On CPU a forward over few tokens runs its matmuls well below their peak (small M), so a forward per row
# length is not always cheapest: rows whose lengths are close share one forward, padded to the longest.
# `row_groups` merges while the padding a length adds is at most this many tokens, the per-forward cost in
# tokens measured by benchmarks/row_groups.py.
MERGE_PAD_TOKENS = 64


def final_hidden_states(
    model: nn.Module,
    batch: PreferenceBatch,
    split_rows: bool = True,
    merge_pad_tokens: int = MERGE_PAD_TOKENS,
) -> torch.Tensor:
    """(2B, T, H) final (normed) hidden states of an unwrapped causal LM (or PEFT model), through its forward.

    On CPU with split_rows, the rows run in groups of close lengths (`row_groups`), one forward per group over
    the group's longest row: a right-padded row's real positions do not depend on what follows them (causal
    attention, positions 0..L-1), so the values at real positions are those of the padded batch, and padding
    past a group's longest row costs no FLOPs. Padding positions hold zeros; every caller reads real positions
    only. The input embedding is looked up once for the whole batch and each forward gets its rows'
    `inputs_embeds`, so backward builds one dense (V, H) embedding gradient per call, not one per group
    (benchmarks/profile_tether.py). On other devices, and without split_rows (FSDP and DeepSpeed ZeRO-3
    expect each sharded layer to run once per forward), the padded batch runs in one call. Either way the
    input embedding runs once per call of this function.
    """
    lengths = (
        _right_padded_lengths(batch.attention_mask)
        if split_rows and batch.input_ids.device.type == "cpu"
        else None
    )
    if lengths is None:
        return _hidden(model, batch.input_ids, batch.attention_mask)
    rows, width = batch.input_ids.shape
    embeds = model.get_input_embeddings()(batch.input_ids)  # (2B, T, H)
    order, parts = [], []
    for length, index in row_groups(lengths, merge_pad_tokens):
        hidden = _hidden(model, inputs_embeds=embeds[index, :length])  # (g, length, H)
        if any(lengths[r] < length for r in index):  # merged shorter rows: zero their padding positions
            hidden = hidden * batch.attention_mask[index, :length].unsqueeze(-1).to(hidden.dtype)
        parts.append(nn.functional.pad(hidden, (0, 0, 0, width - length)))
        order.extend(index)
    stacked = torch.cat(parts)  # rows in `order`
    inverse = torch.empty(rows, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(rows)
    return stacked[inverse.to(stacked.device)]


def row_groups(lengths: list[int], merge_pad_tokens: int = MERGE_PAD_TOKENS) -> list[tuple[int, list[int]]]:
    """The forwards of `final_hidden_states`: (length, row indices) per group, longest first.

    Distinct lengths are visited longest first; the rows of a length join the current group (of length Lg)
    when the padding they add, rows * (Lg - length), is at most merge_pad_tokens, else they start a group.
    With a forward's cost modelled as c * (its tokens + merge_pad_tokens), merging is cheaper exactly then.
    merge_pad_tokens=0: one forward per distinct length (no padding computed)."""
    if merge_pad_tokens < 0:
        raise ValueError(f"merge_pad_tokens must be >= 0, got {merge_pad_tokens}")
    groups: list[tuple[int, list[int]]] = []
    for length in sorted(set(lengths), reverse=True):
        index = [r for r, n in enumerate(lengths) if n == length]
        if groups and len(index) * (groups[-1][0] - length) <= merge_pad_tokens:
            groups[-1][1].extend(index)
        else:
            groups.append((length, index))
    return groups


def _hidden(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=1,
    )
    return out.hidden_states[-1]


def _right_padded_lengths(attention_mask: torch.Tensor) -> list[int] | None:
    """Real tokens per row if every row is ones then zeros (right padding, as `PreferenceCollator` makes)."""
    lengths = attention_mask.sum(1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions.unsqueeze(0) < lengths.unsqueeze(1)):
        return None
    lengths = lengths.tolist()
    return lengths if min(lengths, default=0) > 0 else None
