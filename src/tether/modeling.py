"""Loading local Hugging Face causal LMs and turning a batch into final hidden states and `PairStats`.

Models load from local folders only (no hub), from safetensors only (`use_safetensors=True`), with
`trust_remote_code` off unless configured. The forward pass never computes full logits: the model returns
its final hidden states (logits only for the last position, `logits_to_keep=1`), the response positions are
selected, and `tether.heads.token_stats` applies the output embedding chunk by chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tether.batch import PreferenceBatch
from tether.heads import StatRequest, response_positions, token_stats
from tether.objectives import PairStats
from tether.statistics import pair_stats

if TYPE_CHECKING:
    from tether.config import ModelConfig
    from tether.reference import Reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The model's output head is not a plain linear map of its final hidden states."""


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        config.tokenizer_path or config.path, trust_remote_code=config.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        # Padding positions are masked by attention_mask and labels; the id itself is never trained on.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, config: ModelConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=DTYPES[config.dtype],
        trust_remote_code=config.trust_remote_code,
        use_safetensors=True,
        **kwargs,
    )
    check_supported(model)
    return model


def check_supported(model: nn.Module) -> None:
    """Reject heads that are not logits = W h (+ b): soft-capped or scaled logits would change the math."""
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        value = getattr(cfg, attr, None)
        if value not in (None, 1.0):
            raise UnsupportedModelError(
                f"{type(model).__name__} uses {attr}={value}; tether's chunked head computes logits = W h + b only"
            )
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"the output embedding is a {type(head).__name__}, not nn.Linear (LoRA on lm_head is not supported:"
            " leave lm_head out of lora.target_modules)"
        )


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (as TRL does): the policy's first loss is then exactly log 2."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    cfg = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, name, None), float):
            setattr(cfg, name, 0.0)


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, H), bias (V,) or None) of the model's output embedding (unwrap DDP/PEFT first)."""
    head = model.get_output_embeddings()
    return head.weight, head.bias


def final_hidden_states(model: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """(2B, T, H) final (normed) hidden states, through the model's own forward (DDP/FSDP hooks run).

    On CPU, an unwrapped model (a `PreTrainedModel` or a PEFT model) runs one forward per distinct row length
    over the real tokens only: a right-padded row's real positions do not depend on its padding (causal
    attention, positions 0..L-1), so the values are the same and no FLOPs go to padding. Its padding positions
    then hold zeros; every caller reads real positions only. The input embedding is looked up once for the
    whole batch and each forward gets its rows' `inputs_embeds`, so backward builds one dense (V, H)
    embedding gradient per call, not one per row length (benchmarks/profile_tether.py). On other devices,
    and for DDP/FSDP/DeepSpeed wrappers (which expect one forward per backward), the padded batch runs in one
    call. Either way the input embedding runs once per call of this function.
    """
    lengths = (
        _right_padded_lengths(batch.attention_mask) if _runs_rows_separately(model, batch.input_ids) else None
    )
    if lengths is None:
        return _hidden(model, batch.input_ids, batch.attention_mask)
    rows, width = batch.input_ids.shape
    embeds = model.get_input_embeddings()(batch.input_ids)  # (2B, T, H)
    order, parts = [], []
    for length in sorted(set(lengths), reverse=True):
        index = [r for r in range(rows) if lengths[r] == length]
        hidden = _hidden(model, inputs_embeds=embeds[index, :length])  # (g, length, H), no padding
        parts.append(nn.functional.pad(hidden, (0, 0, 0, width - length)))
        order.extend(index)
    stacked = torch.cat(parts)  # rows in `order`
    inverse = torch.empty(rows, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(rows)
    return stacked[inverse.to(stacked.device)]


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


def _runs_rows_separately(model: nn.Module, input_ids: torch.Tensor) -> bool:
    """Split the batch by row length: on CPU (no kernel-launch cost) for models that are not DDP/FSDP wrapped."""
    from transformers import PreTrainedModel

    if input_ids.device.type != "cpu":
        return False
    fsdp2 = getattr(torch.distributed, "fsdp", None)
    if fsdp2 is not None and isinstance(model, getattr(fsdp2, "FSDPModule", ())):
        return False
    return isinstance(model, PreTrainedModel) or getattr(model, "peft_config", None) is not None


def compute_pair_stats(
    policy: nn.Module,
    head_owner: nn.Module,
    reference: Reference,
    batch: PreferenceBatch,
    indices: list[int],
    request: StatRequest,
    chunk_size: int,
) -> PairStats:
    """Policy forward with gradient, reference statistics without, chunked head -> PairStats of the batch.

    policy: the (possibly wrapped) model to call; head_owner: the unwrapped model owning the output head.
    indices: dataset indices of the batch's pairs (for cached references).
    """
    mask, targets = response_positions(batch.labels)
    ref_hidden = reference.hidden(batch, indices, mask)  # (N, H) or None, computed without grad
    hidden = final_hidden_states(policy, batch)[:, :-1][mask]  # (N, H)
    weight, bias = output_head(head_owner)
    ref_weight, ref_bias = reference.head() if ref_hidden is not None else (None, None)
    tokens = token_stats(
        hidden,
        weight,
        targets,
        bias=bias,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        request=request,
        chunk_size=chunk_size,
    )
    ref_seq = None if ref_hidden is not None else reference.sequence_logps(batch, indices, mask)
    return pair_stats(tokens, mask, ref_sequence_logps=ref_seq)
