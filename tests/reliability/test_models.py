"""Models whose logits are not W h + b: trained on their own log-probs, or refused at load.

Promise (tether.modeling): tether's chunked head computes the model's own logits, including a constant logit
scale and soft-capping (`head_transform`), or the model is refused when it is loaded
(`check_head_matches_logits`: the model's own forward on a few probe tokens against the head), never trained
on wrong numbers. The models are tiny and built here over the toy tokenizer (nothing is downloaded).
"""

from __future__ import annotations

import pytest
import torch
from transformers import GraniteConfig, GraniteForCausalLM

import tether.cli
from tether.config import load_config
from tether.data import PreferenceCollator, load_preference_data
from tether.heads import response_positions, sequence_sums
from tether.train import train


def _granite_dir(folder, tokenizer):
    config = GraniteConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        logits_scaling=8.0,
        initializer_range=0.3,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GraniteForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_granite_logits_scaling_trains_on_the_models_own_logprobs(
    tmp_path, tokenizer, write_jsonl, write_config, good_rows, metrics
):
    """Issue 14: a Granite with logits_scaling=8 gave a sequence log-prob of -50.24 from tether against -49.94
    from the model itself, with no error. Step 1's logged `logps/chosen` and `logps/rejected` (pairs 1-2 in
    file order) now equal the mean sequence log-probs from the model's own logits (1e-4), and the step-1 loss
    is log 2 (the reference is the same model)."""
    model_dir = _granite_dir(tmp_path / "granite", tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", good_rows(4, seed=3))
    cfg = write_config(
        tmp_path / "cfg.yaml",
        data,
        tmp_path / "run",
        model={"path": str(model_dir)},
        data={"shuffle": False},
        optim={"max_steps": 1},
    )
    train(load_config(cfg))
    step1 = metrics(tmp_path / "run" / "metrics.jsonl")[0]

    config = load_config(cfg)
    dataset, _ = load_preference_data(
        str(data),
        tokenizer,
        max_length=config.data.max_length,
        max_prompt_length=config.data.max_prompt_length,
        progress=False,
    )
    batch = PreferenceCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    model = GraniteForCausalLM.from_pretrained(model_dir).eval()
    mask, targets = response_positions(batch.labels)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][mask]
    own = sequence_sums(torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).squeeze(-1), mask)
    assert step1["logps/chosen"] == pytest.approx(float(own[:2].mean()), abs=1e-4)
    assert step1["logps/rejected"] == pytest.approx(float(own[2:].mean()), abs=1e-4)
    # The model's own log-probs are not those of its unscaled head (so this test can fail).
    with torch.no_grad():
        hidden = model(batch.input_ids, output_hidden_states=True).hidden_states[-1][:, :-1][mask]
    unscaled = torch.log_softmax(model.lm_head(hidden).double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert abs(float(sequence_sums(unscaled, mask)[:2].mean()) - step1["logps/chosen"]) > 0.05
    assert step1["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def test_cli_refuses_a_model_its_head_cannot_reproduce(
    tmp_path, tokenizer, model_dir, write_jsonl, write_config, good_rows, capsys
):
    """A model folder whose config.json sets final_logit_softcapping, which Llama's forward ignores: tether
    would cap logits the model never caps. `tether train` exits 2 with one line naming the model class, the
    difference and the field, no traceback, and writes no checkpoint or final model."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    model.config.final_logit_softcapping = 0.5
    odd = tmp_path / "odd"
    model.save_pretrained(odd, safe_serialization=True)
    tokenizer.save_pretrained(odd)
    data = write_jsonl(tmp_path / "train.jsonl", good_rows(4))
    cfg = write_config(tmp_path / "cfg.yaml", data, tmp_path / "run", model={"path": str(odd)})
    capsys.readouterr()
    assert tether.cli.main(["train", str(cfg)]) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("tether train:")]
    assert "Traceback" not in stderr and len(err) == 1, stderr
    assert err[0].startswith("tether train: error: LlamaForCausalLM"), err
    assert "final_logit_softcapping=0.5" in err[0] and "differ" in err[0]
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()
