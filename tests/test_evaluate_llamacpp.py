"""`lorakit eval --backend llamacpp`: the loss llama.cpp computes equals the torch evaluation's (f32), on
instruction data with an adapter and on raw text; a quantized GGUF is read as it is."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit.config import build_config
from lorakit.train.config import EvalConfig
from lorakit.train.evaluate import evaluate
from test_generate_helpers import make_adapter


def test_instruction_loss_matches_torch_with_an_adapter(tiny_model_dir, tiny_alpaca_json, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=3)
    common = {"base_model": str(tiny_model_dir), "data_path": str(tiny_alpaca_json), "lora_weights": [str(adapter)],
              "limit": 6, "cutoff_len": 96}
    ref = evaluate(build_config(EvalConfig, common))
    got = evaluate(build_config(EvalConfig, {**common, "backend": "llamacpp"}))
    assert got.tokens == ref.tokens and got.examples == ref.examples
    assert got.loss == pytest.approx(ref.loss, rel=1e-5)


def test_raw_text_perplexity_and_quantized_gguf(tiny_model_dir, tmp_path, monkeypatch, data_dir):
    from lorakit.export.run import export_model
    from lorakit.models import load_model, load_tokenizer
    from lorakit.train.evaluate_llamacpp import text_windows

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "held_out.txt"
    text.write_text("\n".join((data_dir / "wiki_demo.txt").read_text().splitlines()[-40:]))
    cfg = {"base_model": str(tiny_model_dir), "data_path": str(text), "backend": "llamacpp", "cutoff_len": 64,
           "limit": 4}
    got = evaluate(build_config(EvalConfig, cfg))
    # reference: the fp32 HF model on the same windows, computed here
    tok = load_tokenizer(tiny_model_dir, add_pad_token=False)
    ids = [i for line in text.read_text().splitlines() if line.strip()
           for i in tok(line, add_special_tokens=False)["input_ids"]]
    windows = text_windows(ids, 64, 4)
    model = load_model(tiny_model_dir, "float32").eval()
    with torch.inference_mode():
        losses = [torch.nn.functional.cross_entropy(model(torch.tensor([w])).logits[0, :-1], torch.tensor(w[1:]),
                                                    reduction="sum") for w in windows]
    ref = float(sum(losses)) / (len(windows) * 63)
    assert got.tokens == len(windows) * 63 and got.loss == pytest.approx(ref, rel=1e-5)
    # a quantized GGUF is evaluated with its own (quantized) weights: close to, not equal to, f32
    q = tmp_path / "m-q8.gguf"
    export_model(str(tiny_model_dir), "gguf", q, "q8_0", verify=False)
    quantized = evaluate(build_config(EvalConfig, {**cfg, "base_model": str(q)}))
    assert quantized.loss != got.loss and abs(quantized.loss - got.loss) < 0.05 * got.loss
    assert math.isclose(quantized.perplexity, math.exp(quantized.loss))
    print(json.dumps({"f32": got.perplexity, "q8_0": quantized.perplexity}))
