"""Loading local Hugging Face causal LMs and turning a batch into final hidden states and `PairStats`.

Models load from local folders only (no hub), from safetensors only (`use_safetensors=True`), or from a
local `.gguf` file (`tether.gguf`), with `trust_remote_code` off unless configured. The forward pass never computes full logits: the model returns
its final hidden states (logits only for the last position, `logits_to_keep=1`), the response positions are
selected, and `tether.heads.token_stats` applies the output embedding chunk by chunk.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from tether.batch import PreferenceBatch
from tether.gguf import pretrained_source
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

    source, kwargs = pretrained_source(config.tokenizer_path or config.path, model=False)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code, **kwargs)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked by attention_mask and labels; the id itself is never trained on.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, config: ModelConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM

    source, kwargs = pretrained_source(path, model=True)  # a .gguf file: dequantized to a plain model
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        source,
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


def final_hidden_states(model: nn.Module, batch: PreferenceBatch, split_rows: bool = True) -> torch.Tensor:
    """(2B, T, H) final (normed) hidden states of an unwrapped causal LM (or PEFT model), through its forward.

    On CPU with split_rows, the model runs one forward per distinct row length over the real tokens only: a
    right-padded row's real positions do not depend on its padding (causal attention, positions 0..L-1), so
    the values are the same and no FLOPs go to padding. Its padding positions then hold zeros; every caller
    reads real positions only. The input embedding is looked up once for the whole batch and each forward
    gets its rows' `inputs_embeds`, so backward builds one dense (V, H) embedding gradient per call, not one
    per row length (benchmarks/profile_tether.py). On other devices, and without split_rows (FSDP and
    DeepSpeed ZeRO-3 expect each sharded layer to run once per forward), the padded batch runs in one call.
    Either way the input embedding runs once per call of this function.
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


def compute_pair_stats(
    model: nn.Module,
    reference: Reference,
    batch: PreferenceBatch,
    indices: list[int],
    request: StatRequest,
    chunk_size: int,
    split_rows: bool = True,
) -> PairStats:
    """Policy forward with gradient, reference statistics without, chunked head -> PairStats of the batch.

    model: the unwrapped policy (a causal LM or PEFT model); under DDP, FSDP or DeepSpeed call it through
    `PolicyStatistics`, whose forward runs this function. indices: dataset indices of the batch's pairs
    (for cached references). split_rows: see `final_hidden_states`.
    """
    mask, targets = response_positions(batch.labels)
    ref_hidden = reference.hidden(batch, indices, mask)  # (N, H) or None, computed without grad
    hidden = final_hidden_states(model, batch, split_rows)[:, :-1][mask]  # (N, H)
    weight, bias = output_head(model)
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


class PolicyStatistics(nn.Module):
    """The policy and its chunked head as one module: what DDP, FSDP or DeepSpeed wrap in `tether train`.

    FSDP and DeepSpeed ZeRO-3 shard every parameter and gather a module's parameters only around that
    module's forward. The chunked head reads the output embedding's weight directly (it never calls
    lm_head, which would materialize the full logits), so it must run inside the forward of the module the
    sharding is applied to: this one. Under FSDP the output embedding, input embedding and final norm stay
    in the root unit (this class deliberately has no `get_output_embeddings`, so accelerate does not carve
    lm_head into a unit of its own, gathered only when lm_head's forward runs); under ZeRO-3 `tether.train`
    registers lm_head's parameters as external parameters of this module.

    The module's children are the causal LM's own children (the same objects, not copies), so parameter
    names and state_dict keys are the model's: (DDP) checkpoints load with `from_pretrained`, and accelerate's
    FSDP auto-wrap finds the decoder layers through `_no_split_modules`. The causal LM itself is held as a
    plain attribute, `causal_lm`, and its forward is what `forward` calls.

    split_rows: allow one forward per row length on CPU (`final_hidden_states`); off under FSDP/ZeRO-3.
    """

    def __init__(self, causal_lm: nn.Module, split_rows: bool = True):
        super().__init__()
        object.__setattr__(self, "causal_lm", causal_lm)  # not registered: its children are ours
        for name, child in causal_lm.named_children():
            self.add_module(name, child)
        for name, param in causal_lm.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self._no_split_modules = getattr(causal_lm, "_no_split_modules", None)
        self.split_rows = split_rows

    def train(self, mode: bool = True) -> PolicyStatistics:
        super().train(mode)
        self.causal_lm.train(mode)
        return self

    def forward(
        self,
        reference: Reference,
        batch: PreferenceBatch,
        indices: list[int],
        request: StatRequest,
        chunk_size: int,
    ) -> dict[str, torch.Tensor]:
        """The batch's `PairStats` as a dict of its tensors (`PairStats(**out)` rebuilds it): wrappers find the
        outputs' tensors in dicts, not in dataclasses, and ZeRO-3 re-gathers the head weight for backward
        through hooks on those tensors."""
        # FSDP1's auto-wrap may replace one of our top-level children with its wrapped version (it sets the
        # attribute on the parent it walked, this module): the causal LM must call the wrapped one.
        for name, child in self.named_children():
            if self.causal_lm._modules.get(name) is not child:
                self.causal_lm._modules[name] = child
        stats = compute_pair_stats(
            self.causal_lm, reference, batch, indices, request, chunk_size, self.split_rows
        )
        return {f.name: getattr(stats, f.name) for f in fields(stats) if getattr(stats, f.name) is not None}
