"""Tests for tether.gguf on a tiny GGUF file the test writes itself with gguf's GGUFWriter: a 1-layer Llama
with tied embeddings, a byte-level BPE tokenizer of 261 tokens (pad == eos == <|im_end|>, as SmolLM2's), a
chat template, and one Q8_0-quantized tensor.

What must hold: a .gguf path loads (model and tokenizer) as a plain model holding the file's weights,
dequantized, with no quantization config; `convert` writes a folder that loads the same model and tokenizer;
`tether train` from the .gguf file runs, saves a final model and checkpoints that load with transformers,
and trains exactly as from the converted folder; `tether eval` loads it; missing, foreign, truncated and
tokenizer-less files are refused naming the path (and, in configs, the field).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.cli import main
from tether.config import ConfigError, load_config
from tether.gguf import FOLDER_FILES, GGUFError, check_gguf, convert, is_complete, load
from tether.train import read_metrics, train

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("single_thread")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HIDDEN, HEADS, KV_HEADS, FFN = 16, 4, 2, 32


def _byte_alphabet() -> list[str]:
    """The 256 byte-level BPE symbols (GPT-2's bytes_to_unicode), in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0, tokenizer: bool = True) -> dict[str, np.ndarray]:
    """Write a tiny Llama GGUF file (no output.weight: lm_head is tied to token_embd); returns the weights
    written, by GGUF tensor name, as the float32 arrays a loader must recover (Q8_0 ones dequantized)."""
    tokens = SPECIALS + _byte_alphabet() + ["Ġt", "he"]
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tokens)
        writer.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))
        writer.add_token_merges(["Ġ t", "h e"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_pad_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)
    written = {}

    def tensor(name, *shape, quantized=False):  # shape (out, in), as torch's
        array = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        if quantized:
            qtype = gguf.GGMLQuantizationType.Q8_0
            blocks = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
            array = gguf.quants.dequantize(blocks, qtype)
        else:
            writer.add_tensor(name, array)
        written[name] = array

    tensor("token_embd.weight", vocab, HIDDEN)
    kv = KV_HEADS * HIDDEN // HEADS
    for name, shape in [
        ("attn_q", (HIDDEN, HIDDEN)),
        ("attn_k", (kv, HIDDEN)),
        ("attn_v", (kv, HIDDEN)),
        ("attn_output", (HIDDEN, HIDDEN)),
        ("ffn_gate", (FFN, HIDDEN)),
        ("ffn_up", (FFN, HIDDEN)),
    ]:
        tensor(f"blk.0.{name}.weight", *shape)
    tensor("blk.0.ffn_down.weight", HIDDEN, FFN, quantized=True)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        tensor(name, HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> Path:
    return convert(tiny_gguf[0], tmp_path_factory.mktemp("converted") / "tiny")


def _ids():
    return torch.tensor([[1, 60, 70, 259, 80, 2, 3, 260]])


def test_load_gives_a_plain_model_with_the_files_weights(tiny_gguf):
    path, written = tiny_gguf
    model, tokenizer = load(path)
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the file (no output.weight)
    torch.testing.assert_close(
        model.model.embed_tokens.weight, torch.from_numpy(written["token_embd.weight"])
    )
    # The Q8_0 tensor is dequantized to exactly gguf's own dequantization of the written blocks.
    down = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(down, torch.from_numpy(written["blk.0.ffn_down.weight"]))
    assert not torch.equal(down, torch.zeros_like(down))
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.convert_tokens_to_ids("Ġt") == 259  # the vocabulary and its order are the file's
    assert tokenizer("the").input_ids == [3 + ord("t"), 260]  # byte "t", then the merge "h e" -> "he"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


def test_convert_writes_a_folder_that_loads_the_same_model_and_tokenizer(tiny_gguf, converted):
    model, tokenizer = load(tiny_gguf[0])
    assert is_complete(converted)
    assert all((converted / name).is_file() for name in FOLDER_FILES)
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    again = AutoModelForCausalLM.from_pretrained(converted, use_safetensors=True)
    with torch.no_grad():
        assert torch.equal(again(_ids()).logits, model(_ids()).logits)
    folder_tokenizer = AutoTokenizer.from_pretrained(converted)
    text = "<|im_start|>user\nthe cat<|im_end|>\n"
    assert folder_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert folder_tokenizer.chat_template == tokenizer.chat_template == CHAT_TEMPLATE
    assert folder_tokenizer.pad_token_id == folder_tokenizer.eos_token_id == 2


def test_convert_refuses_a_non_empty_folder_and_leaves_nothing_behind(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(tiny_gguf[0], out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_convert_gguf(tiny_gguf, tmp_path, capsys):
    assert main(["convert-gguf", str(tiny_gguf[0]), str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m") and is_complete(tmp_path / "m")
    assert main(["convert-gguf", str(tmp_path / "nothing.gguf"), str(tmp_path / "n")]) == 2
    assert "nothing.gguf: no such file" in capsys.readouterr().err


def _bad_files(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Broken .gguf files, each with the message expected for it."""
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04 not a gguf file")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    no_tokenizer = tmp_path / "no_tokenizer.gguf"
    write_tiny_gguf(no_tokenizer, tokenizer=False)
    return {
        "missing": (tmp_path / "missing.gguf", "no such file"),
        "foreign": (foreign, "not a GGUF file"),
        "truncated": (truncated, "corrupt or truncated"),
        "no_tokenizer": (
            no_tokenizer,
            r"the GGUF metadata lacks \['tokenizer.ggml.model', 'tokenizer.ggml.tokens'\]",
        ),
    }


@pytest.mark.parametrize("what", ["missing", "foreign", "truncated", "no_tokenizer"])
def test_bad_gguf_files_are_refused_naming_path_and_field(tiny_gguf, tmp_path, train_yaml, what):
    path, message = _bad_files(tmp_path, tiny_gguf[0])[what]
    with pytest.raises(GGUFError, match=message):
        check_gguf(path)
    with pytest.raises(ConfigError, match=rf"^model\.path: {path}: {message}"):
        train(load_config(train_yaml("run", model=path)))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=rf"^reference\.path: {path}: {message}"):
        train(load_config(train_yaml("ref", model=tiny_gguf[0]), [f"reference.path={path}"]))


def test_train_from_gguf_saves_loadable_models_and_equals_training_from_the_folder(
    tiny_gguf, converted, train_yaml, tmp_path
):
    """Before GGUF support the run could not load the file; with a plain `gguf_file=` load it would fail at
    the first checkpoint ("quantized with gguf and is not serializable")."""
    runs = {}
    for name, model in (("gguf", tiny_gguf[0]), ("folder", converted)):
        config = load_config(
            train_yaml(name, model=model, checkpoint={"every": 1}),
            ["optim.max_steps=2", "objective.name=tdpo2", "data.max_length=48", "data.max_prompt_length=24"],
        )
        runs[name] = train(config)
    for folder in (runs["gguf"].final_model, tmp_path / "gguf" / "checkpoints" / "step-00000001"):
        assert "quantization_config" not in json.loads((folder / "config.json").read_text())
        assert isinstance(AutoModelForCausalLM.from_pretrained(folder), torch.nn.Module)
    a = AutoModelForCausalLM.from_pretrained(runs["gguf"].final_model).state_dict()
    b = AutoModelForCausalLM.from_pretrained(runs["folder"].final_model).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "step_time_s"} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "gguf")) == strip(read_metrics(tmp_path / "folder"))
    assert AutoTokenizer.from_pretrained(runs["gguf"].final_model).chat_template == CHAT_TEMPLATE


def test_eval_loads_a_gguf_file_as_the_converted_folder(tiny_gguf, converted):
    from tether.evaluate.config import config_from_dict
    from tether.evaluate.runner import load_model

    cfg = config_from_dict({"models": [str(tiny_gguf[0])], "task": "reverse"})
    from_file, tokenizer = load_model(str(tiny_gguf[0]), cfg, torch.device("cpu"))
    from_folder, _ = load_model(str(converted), cfg, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(from_file(_ids()).logits, from_folder(_ids()).logits)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    with pytest.raises(Exception, match="no such file"):
        load_model(str(tiny_gguf[0].with_name("gone.gguf")), cfg, torch.device("cpu"))
