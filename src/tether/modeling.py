"""Loading Hugging Face causal LMs and turning a batch into final hidden states and `PairStats`.

Models load from local folders, Hub ids through the hub cache (`tether.hub`), or a local `.gguf` file
(`tether.gguf`); from safetensors only (`use_safetensors=True`), with `trust_remote_code` off unless
configured. A PEFT adapter folder loads onto its base (`load_adapter`); `model.load_in_4bit` quantizes the
base with bitsandbytes (QLoRA, CUDA only). The forward pass never computes full logits: the model returns
its final hidden states (logits only for the last position, `logits_to_keep=1`), the response positions are
selected, and `tether.heads.token_stats` applies the output embedding chunk by chunk.

That is only right if the model's logits are its output embedding of its final hidden state, up to a
transform tether knows (`head_transform`: a constant scale, soft-capping). `load_causal_lm` checks it on
every model it loads (`check_head_matches_logits`): the model's own forward on a few probe tokens must give
the logits tether's head gives, or the model is refused.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from tether import hub
from tether.batch import PreferenceBatch
from tether.causal_lm import (
    LOGIT_SCALES,
    UnsupportedModelError,
    final_hidden_states,
    output_head,
    text_config,
)
from tether.gguf import pretrained_source
from tether.heads import IDENTITY, HeadTransform, StatRequest, head_logits, response_positions, token_stats
from tether.objectives import PairStats
from tether.statistics import pair_stats

if TYPE_CHECKING:
    from tether.config import ModelConfig
    from tether.reference import Reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Config fields that transform the logits in some family; named by the probe when a model fails it.
_TRANSFORM_FIELDS = (
    "logits_scaling",
    "logit_scale",
    "lm_head_multiplier",
    "output_multiplier",
    "final_logit_softcapping",
    "logits_soft_cap",
    "scale_width",
    "dim_model_base",
    "mup_width_multiplier",
)
# Probe tolerance, relative to the largest |logit| of the probe (at least 1): 1e-4 for float32 / float64,
# far above matmul round-off (~sqrt(H) * 1.2e-7 of the logits' scale: a few 1e-6 for H = 4096) and far below
# any real transform (a scale of 1/8 moves the largest logit by 7/8 of itself); 4 units in the last place
# for 16-bit weights (bfloat16 4 * 2^-7, float16 4 * 2^-10): the model rounds its logits to 16 bits after
# each step of its transform, tether rounds them once (it transforms in float32).
PROBE_TOKENS = 8
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 4 * 2**-7, torch.float16: 4 * 2**-10}


def load_tokenizer(config: ModelConfig):
    """The tokenizer of `hub.tokenizer_source(config)` (tokenizer_path, the adapter's, or the base model's)."""
    from transformers import AutoTokenizer

    path, revision = hub.tokenizer_source(config)
    source, kwargs = pretrained_source(hub.local_path(path, revision), model=False)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code, **kwargs)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked by attention_mask and labels; the id itself is never trained on.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, config: ModelConfig, revision: str | None = None) -> nn.Module:
    """The causal LM at `path` (a folder, a .gguf file or a Hub id at `revision`), checked (`check_supported`,
    `check_head_matches_logits`); 4-bit quantized when config.load_in_4bit (then on the current CUDA device)."""
    from transformers import AutoModelForCausalLM

    local = hub.local_path(path, revision)
    source, kwargs = pretrained_source(local, model=True)  # a .gguf file: dequantized to a plain model
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if config.load_in_4bit:
        kwargs.update(_four_bit(config))
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=DTYPES[config.dtype],
        trust_remote_code=config.trust_remote_code,
        use_safetensors=True,
        **kwargs,
    )
    if local != path:  # a Hub id: saved configs and adapters name it, not the cache folder
        model.config._name_or_path = path
        model.name_or_path = path
    check_supported(model)
    check_head_matches_logits(model, path)
    return model


def _four_bit(config: ModelConfig) -> dict:
    """from_pretrained's arguments for a 4-bit base (as TRL's get_quantization_config: compute in
    model.dtype), on this process's CUDA device; refused (ConfigError naming the field) without one."""
    import torch
    from transformers import BitsAndBytesConfig

    from tether.config import ConfigError, four_bit_unavailable

    reason = four_bit_unavailable()
    if reason:
        raise ConfigError(f"model.load_in_4bit=true is refused: {reason}")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=DTYPES[config.dtype],
        bnb_4bit_quant_type=config.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.use_bnb_nested_quant,
    )
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def prepare_four_bit(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """peft's `prepare_model_for_kbit_training` (norms and head in float32, input gradients for
    checkpointing) on a 4-bit base, before LoRA adapters are added."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def load_adapter(model: nn.Module, adapter: str) -> nn.Module:
    """The PEFT adapter at `adapter` (a folder or Hub id, adapter_model.safetensors) on `model`, trainable;
    refused like any model if it adapts the output embedding (the chunked head reads its weight)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, hub.local_path(adapter), is_trainable=True)
    check_supported(peft_model)
    check_head_matches_logits(peft_model, adapter)
    return peft_model


def check_supported(model: nn.Module) -> None:
    """Reject output embeddings that the chunked head cannot read: it needs an nn.Linear's weight (and bias)."""
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


def _probe_ids(vocab: int, device: torch.device) -> torch.Tensor:
    """(1, PROBE_TOKENS) fixed token ids spread over the vocabulary (a stride prime to any vocabulary size)."""
    return torch.tensor([[(1 + 7919 * i) % vocab for i in range(PROBE_TOKENS)]], device=device)


@torch.no_grad()
def check_head_matches_logits(model: nn.Module, name: str | None = None) -> None:
    """Refuse a model whose own logits tether's head does not reproduce.

    Runs the model's forward on PROBE_TOKENS fixed tokens (eval mode, no grad) and compares its logits with
    the chunked head's: final hidden state -> W h + b -> `head_transform(model)`. They must agree within
    PROBE_RTOL[dtype] x max(1, max |logit|); otherwise `UnsupportedModelError` names the model class, the
    largest difference and the likely cause. Works with tied embeddings (the head reads the same weight).
    name: shown in the error (the model's folder).
    """
    weight, bias, transform = output_head(model)
    embeddings = model.get_input_embeddings()
    vocab = min(weight.shape[0], getattr(embeddings, "num_embeddings", weight.shape[0]))
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=_probe_ids(vocab, weight.device), output_hidden_states=True, use_cache=False)
    finally:
        model.train(was_training)
    what = f"{type(model).__name__}" + (f" ({name})" if name else "")
    hidden = getattr(out, "hidden_states", None)
    if not hidden:
        raise UnsupportedModelError(
            f"{what} returns no hidden states (output_hidden_states=True): tether needs them"
        )
    theirs = out.logits[0].to(torch.float64)
    plain = head_logits(hidden[-1][0], weight, bias).to(torch.float64)  # W h + b
    if theirs.shape != plain.shape:
        raise UnsupportedModelError(
            f"{what}: its logits have shape {tuple(theirs.shape)} on {PROBE_TOKENS} probe tokens, tether's head"
            f" gives {tuple(plain.shape)} (a vocabulary slice or padding in the model's forward?)"
        )
    magnitude = max(1.0, float(theirs.abs().max()))
    rtol = PROBE_RTOL.get(weight.dtype, 1e-4)
    tol = rtol * magnitude
    # Log-probs are what tether uses (shifting a whole row of logits changes none); a logit error d moves
    # them by at most 2 d.
    diff = float((transform(plain).log_softmax(-1) - theirs.log_softmax(-1)).abs().max())
    if not diff <= 2 * tol:  # (also refuses NaN)
        cause = _likely_cause(model, transform, plain, theirs, tol)
        raise UnsupportedModelError(
            f"{what}: the model's own log-probs differ from tether's head's (final hidden state -> W h + b ->"
            f" {transform} -> log-softmax) by up to {diff:.4g} on {PROBE_TOKENS} probe tokens, beyond the"
            f" tolerance {2 * tol:.3g} (2 x {rtol:.3g} x max(1, largest |logit|) = {magnitude:.4g}, in"
            f" {weight.dtype}). Likely cause: {cause}. Training would use wrong log-probs, so the model is"
            " refused."
        )


def _likely_cause(
    model: nn.Module, transform: HeadTransform, plain: torch.Tensor, theirs: torch.Tensor, tol: float
) -> str:
    """Why the model's logits `theirs` differ from `transform(plain)`, plain = W h + b (both (T, V) float64)."""
    cfg = text_config(model)
    model_type = getattr(cfg, "model_type", None)
    fields = [
        f"{f}={getattr(cfg, f)!r}" for f in _TRANSFORM_FIELDS if getattr(cfg, f, None) not in (None, 1, 1.0)
    ]
    if not transform.is_identity and (plain - theirs).abs().max() <= tol:
        return (
            f"the model's logits are W h + b itself: its forward ignores {transform}, which tether read from its"
            f" config ({', '.join(fields) or 'no field'}); remove that field from config.json if the model"
            " really does not use it"
        )
    scale = float((plain * theirs).sum() / (plain * plain).sum().clamp_min(1e-300))
    if (plain * scale - theirs).abs().max() <= tol:
        return (
            f"the logits are W h + b times a constant {scale:.6g}, which tether does not read from the config of"
            f" model_type {model_type!r}" + (f" (it sets {', '.join(fields)})" if fields else "")
        )
    if fields:
        return (
            f"its config sets {', '.join(fields)}, a logit transform that tether does not apply as this model"
            f" does for model_type {model_type!r} (known: a constant scale for {sorted(LOGIT_SCALES)} and"
            f" soft-capping)"
        )
    return (
        "the forward changes the logits in a way its config does not name (a custom or remote-code head, a"
        " hook on lm_head, or final hidden states that are not the head's input)"
    )


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
    weight, bias, transform = output_head(model)
    ref_weight, ref_bias, ref_transform = reference.head() if ref_hidden is not None else (None, None, None)
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
        transform=transform,
        ref_transform=ref_transform or IDENTITY,
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

    split_rows: allow one forward per group of close row lengths on CPU (`final_hidden_states`); off under
        FSDP/ZeRO-3.
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
        through hooks on those tensors. A view is returned as a copy: FSDP2 registers its pre-backward hook on
        each output, and an in-place op on a view would drop it (PyTorch warns of exactly that)."""
        # FSDP1's auto-wrap may replace one of our top-level children with its wrapped version (it sets the
        # attribute on the parent it walked, this module): the causal LM must call the wrapped one.
        for name, child in self.named_children():
            if self.causal_lm._modules.get(name) is not child:
                self.causal_lm._modules[name] = child
        stats = compute_pair_stats(
            self.causal_lm, reference, batch, indices, request, chunk_size, self.split_rows
        )
        out = {f.name: getattr(stats, f.name) for f in fields(stats) if getattr(stats, f.name) is not None}
        return {
            name: t.clone() if isinstance(t, torch.Tensor) and t._is_view() else t for name, t in out.items()
        }
