"""Sampling speed: tether eval's sampler against plain `model.generate`, side by side in one run.

Both draw n samples per prompt for the same prompts at the same temperature, top_p and max_new_tokens, all
P x n rows in one batch. The script prints new tokens (up to and including the first EOS) per wall second
and per CPU second of the process for each (one thread: the CPU time is the work, less sensitive than wall
time to other processes on a shared machine), their ratios, and the mean completion length and EOS rate of
each as a check that both sample the same distribution (tests/test_evaluate.py checks that properly).

- plain: `model.generate(input_ids, attention_mask, num_return_sequences=n, do_sample=True, ...)` on the
  left-padded prompts, top-k and the model's other decoding defaults off, as a user would write it.
- tether: `tether.evaluate.sampling.generate_shared_prefix`, the loop `tether eval` runs for each batch
  (sampler "shared_prefix"): one prefill per prompt shared by its n rows, finished rows leave the batch.

Models: "toy" (tether's tiny Llama on the toy tokenizer, the demo's reference shape) and "smol"
(SmolLM2-135M-Instruct: the converted folder at --smol-path when present, else random weights of the same
config and random prompt ids of a chat prompt's length). Each (model, method) pair runs --repeats times,
alternating methods; the ratio uses the medians.

    python benchmarks/sampling.py            # 4 prompts x 16 samples x 48 new tokens, 3 repeats
    python benchmarks/sampling.py --quick    # 2 prompts x 16 samples x 16 new tokens, 1 repeat (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tether.evaluate.sampling import format_prompts, generate_shared_prefix, left_pad
from tether.toy.model import build_tiny_llama
from tether.toy.tasks import get_task
from tether.toy.tokenizer import build_tokenizer

SMOL_PROMPTS = [
    "What is 7 + 5?",
    "List the whole numbers from 3 to 9.",
    "Reverse the word 'planet'.",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me a synonym for 'happy'.",
    "Count the letters in 'banana'.",
]


def smol_model(path: str) -> tuple[Any, list[list[int]], int, str]:
    """(model, prompt ids, eos id, description): the real SmolLM2 folder, else its config at random."""
    if os.path.isdir(path):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        formatted = format_prompts(tokenizer, SMOL_PROMPTS)
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in formatted]
        return model, ids, int(tokenizer.eos_token_id), f"SmolLM2-135M-Instruct ({path})"
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 49152, (30 + i,), generator=g).tolist() for i in range(len(SMOL_PROMPTS))]
    return model, ids, 2, "SmolLM2-135M config, random weights (no converted folder)"


def toy_model() -> tuple[Any, list[list[int]], int, str]:
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, seed=0)
    with torch.no_grad():  # sharper than the random init, so lengths vary as a trained model's do
        model.lm_head.weight.mul_(5.0)
    prompts = get_task("reverse").make_prompts(8, seed=0)
    formatted = format_prompts(tokenizer, prompts)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in formatted]
    return model, ids, int(tokenizer.eos_token_id), "toy tiny Llama (113,600 parameters)"


def cut(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


@torch.no_grad()
def plain(
    model: Any, prompt_ids: list[list[int]], eos: int, args: argparse.Namespace, seed: int
) -> list[list[int]]:
    input_ids, mask = left_pad(prompt_ids, eos)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        num_return_sequences=args.n,
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=0,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=eos,
        eos_token_id=eos,
    )
    return [cut(row, eos) for row in out[:, input_ids.shape[1] :].tolist()]


def tether(
    model: Any, prompt_ids: list[list[int]], eos: int, args: argparse.Namespace, seed: int
) -> list[list[int]]:
    return generate_shared_prefix(
        model,
        prompt_ids,
        [args.n] * len(prompt_ids),
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        eos={eos},
        pad_id=eos,
        generator=torch.Generator().manual_seed(seed),
    )


def bench(name: str, build: Any, args: argparse.Namespace) -> float:
    model, prompt_ids, eos, description = build()
    prompt_ids = prompt_ids[: args.prompts]
    print(f"\n{name}: {description}")
    print(
        f"  {len(prompt_ids)} prompts ({min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} tokens) x "
        f"{args.n} samples, max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, "
        f"top_p {args.top_p}, {torch.get_num_threads()} thread(s)"
    )
    rates: dict[str, list[float]] = {"plain": [], "tether": []}
    cpu_rates: dict[str, list[float]] = {"plain": [], "tether": []}
    rows: dict[str, list[list[int]]] = {"plain": [], "tether": []}
    for r in range(args.repeats):
        for method, fn in (("plain", plain), ("tether", tether)):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = fn(model, prompt_ids, eos, args, seed=r)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            tokens = sum(len(row) for row in out)
            rates[method].append(tokens / seconds)
            cpu_rates[method].append(tokens / cpu)
            rows[method] += out
            print(
                f"  run {r + 1} {method:6s} {tokens:6d} new tokens in {seconds:7.2f} s = {tokens / seconds:8.1f}"
                f" tokens/s; {cpu:7.2f} CPU s = {tokens / cpu:8.1f} tokens/CPU-s; load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    for method in ("plain", "tether"):
        lengths = [len(row) for row in rows[method]]
        eos_rate = sum(1 for row in rows[method] if row and row[-1] == eos) / len(rows[method])
        print(
            f"  {method:6s} median {statistics.median(rates[method]):8.1f} tokens/s "
            f"(range {min(rates[method]):.1f}-{max(rates[method]):.1f}), "
            f"{statistics.median(cpu_rates[method]):8.1f} tokens/CPU-s "
            f"(range {min(cpu_rates[method]):.1f}-{max(cpu_rates[method]):.1f}); "
            f"mean length {statistics.mean(lengths):.2f} tokens, EOS rate {eos_rate:.3f}"
        )
    ratio = statistics.median(rates["tether"]) / statistics.median(rates["plain"])
    cpu_ratio = statistics.median(cpu_rates["tether"]) / statistics.median(cpu_rates["plain"])
    print(
        f"  ratio tether / plain: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time"
        f" (target >= 2x: {'met' if min(ratio, cpu_ratio) >= 2 else 'not met'})"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 prompts x 16 x 16 tokens, 1 repeat")
    parser.add_argument("--models", default="toy,smol", help="comma-separated: toy, smol")
    parser.add_argument("--smol-path", default="/tmp/smol/model")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens, args.repeats = 2, 16, 1
    torch.set_num_threads(args.threads)
    builders = {"toy": toy_model, "smol": lambda: smol_model(args.smol_path)}
    for name in args.models.split(","):
        bench(name, builders[name], args)


if __name__ == "__main__":
    main()
