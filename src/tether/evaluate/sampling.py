"""Sample completions from a local Hugging Face causal LM over a temperature grid, with a JSONL cache.

Prompts are formatted with the tokenizer's chat template (one user turn, add_generation_prompt=True) when
the tokenizer has one and `use_chat_template` is on, else used raw (tokenized with the tokenizer's special
tokens). Each prompt is repeated n times and the flat list is generated in batches of `batch_size` rows,
left-padded. temperature 0 means greedy decoding, done once per prompt and repeated n times.

Sampling draws from the temperature-scaled distribution with nucleus `top_p` only: top-k, repetition
penalty, min-p and typical-p from the model's own generation_config are switched off, so that pass@k and
diversity measure the model and not a decoding default.

Two samplers draw from that same distribution (`sampler`):
- "shared_prefix" (the default): tether's own decoding loop. A batch's distinct prompts are prefilled once
  and their KV cache is copied to each of their rows (a prompt's n samples share one prefill); a row that
  has produced EOS leaves the batch, so later steps only run the rows still generating. Each step scales the
  float32 logits by 1/temperature, keeps the top_p nucleus by transformers' TopPLogitsWarper rule (a token
  stays when the tokens more likely than it hold less than top_p; the most likely always stays), found among
  the 256 most likely tokens by `topk` (a full sort only for rows whose nucleus is larger), and draws one
  token per row by inverse CDF with a uniform from a `torch.Generator` seeded with `seed + 1_000_003 * b` for
  batch b. Against `generate`'s full sort and `torch.multinomial` only float rounding differs.
- "generate": `model.generate` on the left-padded rows, batch b under `torch.manual_seed(seed +
  1_000_003 * b)` inside `torch.random.fork_rng`.
Both are reproducible for a fixed batch size and leave the caller's RNG state untouched. They consume
random numbers differently, so the same seed gives different (equally distributed) samples; greedy
decoding gives the same tokens with both.

Cache: with `cache_dir`, a run is stored as `samples-<key>.jsonl`, the key a SHA-256 over (model id and,
for a local folder, the names, sizes and mtimes of its weight files; temperature; top_p; n;
max_new_tokens; seed; batch size; the formatted prompts; the sampler, except for "generate", whose keys are
those written before the shared-prefix sampler existed). A run whose file exists is read back, not
regenerated. The file's first line is a header {"key", "meta"}; then one line per prompt.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from tether.files import atomic_write

CACHE_FORMAT = 1
SAMPLERS = ("shared_prefix", "generate")


@dataclass
class SampleSet:
    """Samples of one model at one temperature.

    prompts, formatted, prompt_ids: (P,) raw prompt, text fed to the model, its token ids.
    completions: (P, n) decoded text without special tokens.
    completion_ids: (P, n, L_i) generated ids up to and including the first EOS (no padding).
    """

    prompts: list[str]
    formatted: list[str]
    prompt_ids: list[list[int]]
    completions: list[list[str]]
    completion_ids: list[list[list[int]]]
    meta: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, use_chat_template: bool = True) -> bool:
    return bool(use_chat_template and getattr(tokenizer, "chat_template", None))


def format_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], use_chat_template: bool = True
) -> list[str]:
    """The text given to the model for each prompt: chat-templated user turn or the raw prompt."""
    if not uses_chat_template(tokenizer, use_chat_template):
        return list(prompts)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, formatted: Sequence[str], templated: bool
) -> list[list[int]]:
    """Token ids of formatted prompts; a chat template already holds its special tokens."""
    return [list(tokenizer(text, add_special_tokens=not templated)["input_ids"]) for text in formatted]


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id, else the EOS id, else 0 (padding is masked out, its value never matters)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to the longest sequence: (input_ids (B, T) long, attention_mask (B, T) long)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for tid in [gen_eos, tokenizer.eos_token_id]:
        if isinstance(tid, int):
            ids.add(tid)
        elif isinstance(tid, (list, tuple)):
            ids.update(int(t) for t in tid)
    return ids


def _weights_fingerprint(path: str) -> list[tuple[str, int, int]]:
    if not os.path.isdir(path):
        return []
    out = []
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin", ".pt")):
            st = os.stat(os.path.join(path, name))
            out.append((name, st.st_size, st.st_mtime_ns))
    return out


def cache_key(
    model_id: str,
    formatted_prompts: Sequence[str],
    temperature: float,
    top_p: float,
    n: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    sampler: str = "generate",
) -> str:
    """SHA-256 hex key of everything that determines a run's samples (see the module docstring).

    sampler "generate" leaves the payload as it was before samplers existed, so its old caches stay valid.
    """
    prompts_hash = hashlib.sha256(json.dumps(list(formatted_prompts)).encode()).hexdigest()
    payload = {
        "format": CACHE_FORMAT,
        "model": model_id,
        "weights": _weights_fingerprint(model_id),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "n": int(n),
        "max_new_tokens": int(max_new_tokens),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "prompts": prompts_hash,
    }
    if sampler != "generate":
        payload["sampler"] = sampler
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"samples-{key[:24]}.jsonl")


def _read_cache(path: str, key: str, num_prompts: int) -> SampleSet | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or lines[0].get("key") != key or len(lines) != num_prompts + 1:
        return None
    rows = lines[1:]
    return SampleSet(
        prompts=[r["prompt"] for r in rows],
        formatted=[r["formatted"] for r in rows],
        prompt_ids=[r["prompt_ids"] for r in rows],
        completions=[r["completions"] for r in rows],
        completion_ids=[r["completion_ids"] for r in rows],
        meta=lines[0]["meta"],
        from_cache=True,
    )


def _write_cache(path: str, key: str, samples: SampleSet) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps({"key": key, "meta": samples.meta}) + "\n")
        for i in range(len(samples.prompts)):
            row = {
                "prompt": samples.prompts[i],
                "formatted": samples.formatted[i],
                "prompt_ids": samples.prompt_ids[i],
                "completions": samples.completions[i],
                "completion_ids": samples.completion_ids[i],
            }
            f.write(json.dumps(row) + "\n")


def _generation_config(
    temperature: float, top_p: float, max_new_tokens: int, pad_id: int, eos: set[int]
) -> GenerationConfig:
    greedy = temperature == 0
    return GenerationConfig(
        do_sample=not greedy,
        temperature=1.0 if greedy else float(temperature),
        top_p=1.0 if greedy else float(top_p),
        top_k=0,
        min_p=None,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        max_new_tokens=int(max_new_tokens),
        pad_token_id=pad_id,
        eos_token_id=sorted(eos) if eos else None,
    )


def _cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    for j, t in enumerate(ids):
        if t in eos:
            return ids[: j + 1]
    return ids


NUCLEUS_CANDIDATES = 256  # most likely tokens searched first for the top_p nucleus (then a full sort)


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The top_p nucleus of each row of probs (R, V): (weights (R, K), token ids (R, K)), most likely first.

    Token i is kept when the mass of the tokens ranked above it is below top_p: the rule of transformers'
    TopPLogitsWarper (drop i when the ascending cumulative mass up to i is <= 1 - top_p), so the most likely
    token always stays. Rows whose nucleus fits in the first NUCLEUS_CANDIDATES tokens (found with topk, much
    cheaper than sorting the vocabulary) are resolved there; the others are sorted in full.
    """
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    top, ids = probs.topk(k, dim=-1)
    open_rows = (top.sum(-1) < top_p).nonzero().squeeze(1)  # a token beyond the k-th may be in the nucleus
    if len(open_rows):
        full, full_ids = probs[open_rows].sort(dim=-1, descending=True)
        top = torch.cat([top, top.new_zeros(len(top), probs.shape[-1] - k)], dim=1)
        ids = torch.cat([ids, ids.new_zeros(len(ids), probs.shape[-1] - k)], dim=1)
        top[open_rows], ids[open_rows] = full, full_ids
    above = top.cumsum(-1) - top
    return top * (above < top_p), ids


def _next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """One token per row from float32 logits (R, V): argmax at temperature 0, else a draw from the
    temperature-scaled distribution restricted to its top_p nucleus (transformers' TemperatureLogitsWarper
    then TopPLogitsWarper), by inverse CDF: u ~ U[0, 1) times the kept mass, the first token whose
    cumulative weight exceeds it (one uniform per row; faster than torch.multinomial on CPU)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = (logits / temperature).softmax(dim=-1)
    if top_p < 1.0:
        weights, ids = _nucleus(probs, top_p)
    else:
        weights, ids = probs, None
    cdf = weights.double().cumsum(dim=-1)
    u = torch.rand(len(cdf), 1, generator=generator, device=cdf.device, dtype=torch.float64) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
    return pick.squeeze(1) if ids is None else ids.gather(1, pick).squeeze(1)


@torch.no_grad()
def generate_shared_prefix(
    model: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    repeats: Sequence[int],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos: set[int],
    pad_id: int,
    generator: torch.Generator,
) -> list[list[int]]:
    """Completions of `repeats[i]` rows per prompt i, each up to and including its first EOS.

    The P prompts are left-padded and prefilled once; the cache, attention mask and positions are then
    copied to sum(repeats) rows, prompt i's rows consecutive. A row leaves the batch once it has produced an
    EOS id; at most max_new_tokens tokens per row. Positions follow `generate`'s (attention-mask cumsum).
    Returns (sum(repeats), L_r) token ids, rows in order.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    input_ids, mask = left_pad(prompt_ids, pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config)
    # logits of the last position only, where the model supports it (remote-code models may not)
    last_only = (
        {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    )
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        **last_only,
    )
    expand = torch.repeat_interleave(
        torch.arange(len(prompt_ids), device=device), torch.tensor(list(repeats), device=device)
    )
    logits = out.logits[:, -1].float()[expand]
    cache.batch_select_indices(expand)
    mask, last_pos = mask[expand], positions[expand, -1:]
    rows = torch.arange(len(expand), device=device)  # original row index of each active row
    eos_ids = torch.tensor(sorted(eos), device=device, dtype=torch.long)
    tokens: list[torch.Tensor] = []  # step t: (sum(repeats),) the token of each row, -1 once it ended
    for step in range(max_new_tokens):
        new = _next_tokens(logits, temperature, top_p, generator)
        column = torch.full((len(expand),), -1, dtype=torch.long, device=device)
        column[rows] = new
        tokens.append(column)
        if step == max_new_tokens - 1:
            break
        alive = ~torch.isin(new, eos_ids)
        if not bool(alive.all()):
            if not bool(alive.any()):
                break
            keep = alive.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, new, mask, last_pos = rows[keep], new[keep], mask[keep], last_pos[keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        last_pos = last_pos + 1
        out = model(
            input_ids=new[:, None],
            attention_mask=mask,
            position_ids=last_pos,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1].float()
    table = torch.stack(tokens, dim=1).tolist()
    return [[t for t in row if t >= 0] for row in table]


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    temperature: float,
    top_p: float = 1.0,
    n: int = 1,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 8,
    use_chat_template: bool = True,
    cache_dir: str | None = None,
    model_id: str | None = None,
    progress: bool = True,
    sampler: str = "shared_prefix",
) -> SampleSet:
    """n completions per prompt at one temperature (0 = greedy), read from the cache when present.

    Args:
        model, tokenizer: a causal LM and its tokenizer; the model's device is used.
        prompts: (P,) raw prompts.
        temperature: >= 0; top_p: in (0, 1]; n: samples per prompt; max_new_tokens: per sample.
        seed: base seed; batch_size: rows (prompt copies) per `generate` call.
        cache_dir: folder of JSONL caches, None for no cache; model_id: the cache's model identity
            (defaults to the model's `name_or_path`, which must then be non-empty).
        sampler: "shared_prefix" (tether's loop) or "generate" (`model.generate`); see the module docstring.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"n, batch_size and max_new_tokens must be >= 1, got {n}, {batch_size}, {max_new_tokens}"
        )
    templated = uses_chat_template(tokenizer, use_chat_template)
    formatted = format_prompts(tokenizer, prompts, use_chat_template)
    meta = {
        "model": model_id or getattr(model, "name_or_path", "") or "",
        "temperature": float(temperature),
        "top_p": float(top_p),
        "n": n,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "batch_size": batch_size,
        "chat_template": templated,
        "sampler": sampler,
    }
    key = path = None
    if cache_dir is not None:
        if not meta["model"]:
            raise ValueError("sample: caching needs a model_id (the model has no name_or_path)")
        key = cache_key(
            meta["model"], formatted, temperature, top_p, n, max_new_tokens, seed, batch_size, sampler
        )
        path = _cache_path(cache_dir, key)
        cached = _read_cache(path, key, len(prompts))
        if cached is not None:
            return cached

    prompt_ids = encode_prompts(tokenizer, formatted, templated)
    pad_id, eos = pad_token_id(tokenizer), _eos_ids(model, tokenizer)
    gen_config = _generation_config(temperature, top_p, max_new_tokens, pad_id, eos)
    copies = 1 if temperature == 0 else n
    flat = [(i, s) for i in range(len(prompts)) for s in range(copies)]
    outputs: list[list[list[int]]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    batches = range(0, len(flat), batch_size)
    try:
        for b, start in enumerate(tqdm(batches, desc=f"sampling T={temperature:g}", disable=not progress)):
            rows = flat[start : start + batch_size]
            if sampler == "shared_prefix":
                distinct = sorted({i for i, _ in rows})  # rows of one prompt are consecutive in `flat`
                generator = torch.Generator(device=device).manual_seed(seed + 1_000_003 * b)
                new = generate_shared_prefix(
                    model,
                    [prompt_ids[i] for i in distinct],
                    [sum(1 for i, _ in rows if i == d) for d in distinct],
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    eos=eos,
                    pad_id=pad_id,
                    generator=generator,
                )
            else:
                input_ids, attention_mask = left_pad([prompt_ids[i] for i, _ in rows], pad_id)
                with torch.random.fork_rng(devices=rng_devices):
                    torch.manual_seed(seed + 1_000_003 * b)
                    out = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        generation_config=gen_config,
                    )
                new = out[:, input_ids.shape[1] :].tolist()
            for (i, _), ids in zip(rows, new):
                outputs[i].append(_cut_at_eos(ids, eos))
    finally:
        model.train(was_training)
    if temperature == 0:
        outputs = [o * n for o in outputs]
    completions = [
        [tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True) for ids in per_prompt]
        for per_prompt in outputs
    ]
    result = SampleSet(list(prompts), formatted, prompt_ids, completions, outputs, meta)
    if path is not None and key is not None:
        _write_cache(path, key, result)
    return result


def sample_grid(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    temperatures: Sequence[float],
    **kwargs: Any,
) -> dict[float, SampleSet]:
    """`sample` at every temperature of the grid; keyword arguments as for `sample`."""
    return {float(t): sample(model, tokenizer, prompts, temperature=float(t), **kwargs) for t in temperatures}
