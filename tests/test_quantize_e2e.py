"""QLoRA end to end on the CPU: finetune on a 4-bit base, load the adapter with PEFT onto a base quantized the
same way, generate with it, merge it into the full-precision base (= PEFT's merge there) and export; the CPU
inference path on a quantized base; what is refused, one line each."""

from __future__ import annotations

import shutil

import pytest
import torch

from cli_helpers import run_cli
from lorakit.generate.cpu_inference import FusedAttention, PackedLinear, optimize_for_cpu
from lorakit.models import load_model
from lorakit.models.quantize import bnb_config, check_quantized_base
from lorakit.models.rmsnorm import RMSNorm
from lorakit.precision import bf16_supported
from test_generate_cpu_inference import decode_logits
from test_quantize import qopts

IDS = torch.tensor([[0, 0, 0, 5, 60, 700, 80], [1, 42, 43, 44, 45, 46, 47]])
MASK = (torch.arange(7) >= torch.tensor([[3], [0]])).long()


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = run_cli(*argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(err: str) -> str:
    """The one `error:` line the CLI printed (progress bars of the test's own loads aside)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.skipif(not bf16_supported("cpu"), reason="the CPU path prepacks bf16 only")
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_cpu_inference_path_on_a_quantized_base(tiny_model_dir, quantization, caplog):
    """optimize_for_cpu keeps the quantized linears, fuses the norms and prepacks the bf16 lm_head: same logits
    as the quantized model as transformers runs it, prefill and cached decode."""
    ref = load_model(tiny_model_dir, torch.bfloat16, quantization=qopts(quantization)).eval()
    fast = load_model(tiny_model_dir, torch.bfloat16, quantization=qopts(quantization)).eval()
    with caplog.at_level("INFO", logger="lorakit"):
        summary = optimize_for_cpu(fast)
    assert "stay separate 4/8-bit products" in caplog.text
    kinds = {type(m) for m in fast.modules()}
    assert FusedAttention not in kinds and RMSNorm in kinds and PackedLinear in kinds, summary
    assert type(fast.model.layers[0].self_attn.q_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    for step, (want, got) in enumerate(zip(decode_logits(ref, IDS, MASK, 3), decode_logits(fast, IDS, MASK, 3),
                                           strict=True)):
        assert (got - want).abs().max() <= 0.02 * want.abs().max(), f"step {step}"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits.float()


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_finetune_load_generate_merge_export(tiny_model_dir, tiny_alpaca_json, tmp_path, capsys, quantization):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.config import build_config
    from lorakit.generate.config import GenerateConfig
    from lorakit.generate.runner import Engine

    adapter = tmp_path / "qlora"
    code, out, err = cli(capsys, "finetune", "--base-model", tiny_model_dir, "--data-path", tiny_alpaca_json,
                         "--output-dir", adapter, "--quantization", quantization, "--gradient-checkpointing",
                         "--precision", "fp32", "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "4",
                         "--learning-rate", "2e-2", "--warmup-steps", "0", "--cutoff-len", "64", "--val-set-size", "0",
                         "--lora-target-modules", "all-linear", "--nproc", "auto")
    assert code == 0, err
    assert "done: 2 steps" in out
    assert f"quantization: {quantization}" in (adapter / "lorakit_config.yaml").read_text()
    # PEFT loads the adapter onto a base quantized the same way; lorakit's engine computes the same logits
    base4 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 quantization_config=bnb_config(qopts(quantization), torch.float32))
    peft4 = PeftModel.from_pretrained(base4, str(adapter)).eval()
    engine = Engine.load(build_config(GenerateConfig, dict(base_model=str(tiny_model_dir), lora_weights=[str(adapter)],
                                                           quantization=quantization, precision="fp32")))
    assert engine.adapter_names and not engine.merged_name  # kept separate on 4/8-bit weights
    want = _logits(peft4)
    torch.testing.assert_close(_logits(engine.model), want)
    with peft4.disable_adapter():
        assert (_logits(peft4) - want).abs().max() > 1e-3  # the adapter changes the output
    # eval on the same base: the masked loss of PEFT's model on the same examples
    from lorakit.data import read_examples, tokenize_examples
    from lorakit.prompts import get_prompter
    from lorakit.train.config import EvalConfig
    from lorakit.train.evaluate import evaluate, masked_loss

    result = evaluate(build_config(EvalConfig, dict(base_model=str(tiny_model_dir), data_path=str(tiny_alpaca_json),
                                                    lora_weights=[str(adapter)], quantization=quantization,
                                                    limit=8, cutoff_len=64)))
    tok = engine.tokenizer
    examples = read_examples(tiny_alpaca_json)[0][:8]
    features = tokenize_examples(examples, get_prompter("alpaca", tok), tok, 64, True, True)
    assert result.loss == pytest.approx(masked_loss(peft4, tok, features)[0], rel=1e-4)
    code, out, err = cli(capsys, "generate", "--base-model", tiny_model_dir, "--lora-weights", adapter,
                         "--quantization", quantization, "--instruction", "Say hi", "--max-new-tokens", "4",
                         "--temperature", "0", "--no-stream")
    assert code == 0, err
    if quantization == "8bit":
        return  # merging and exporting do not depend on how the base was quantized in training

    # merge into the full-precision base: lorakit's verify compares with PEFT's merge; check it here as well
    merged = tmp_path / "merged"
    code, out, err = cli(capsys, "merge", "--base-model", tiny_model_dir, "--lora-model", adapter,
                         "--output-dir", merged)
    assert code == 0, err
    assert "verify: max |logit diff|" in out
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
    mine = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(mine), _logits(reference), atol=1e-4, rtol=1e-4)
    code, out, err = cli(capsys, "export", "--model", merged, "--output", tmp_path / "m.gguf", "--outtype", "f32")
    assert code == 0, err
    assert (tmp_path / "m.gguf").stat().st_size > 0


def test_merge_refuses_a_quantized_base(tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quantized = tmp_path / "base-4bit"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config(qopts("4bit"),
                                                                                                 torch.float32))
    model.save_pretrained(quantized)  # a real bitsandbytes 4-bit checkpoint
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, quantized / name)
    adapter = tmp_path / "adapter"
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(plain, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(adapter)
    code, out, err = cli(capsys, "merge", "--base-model", quantized, "--lora-model", adapter,
                         "--output-dir", tmp_path / "out")
    assert code == 2
    line = error_line(err)
    assert "bitsandbytes 4-bit (nf4)" in line and "full-precision base" in line, err
    assert not (tmp_path / "out").exists()
    # the same folder given to --quantization: refused too (quantize the original instead)
    from lorakit.models.quantize import QuantizedBaseError

    with pytest.raises(QuantizedBaseError, match="already quantized"):
        check_quantized_base(quantized, qopts("8bit"))


def test_cli_refusals(tiny_model_dir, tiny_alpaca_json, tmp_path, capsys, monkeypatch):
    args = ["finetune", "--base-model", tiny_model_dir, "--data-path", tiny_alpaca_json, "--output-dir", tmp_path / "o",
            "--quantization", "8bit"]
    code, _, err = cli(capsys, *args, "--nproc", "2")
    assert code == 2 and "--nproc 2" in error_line(err), err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    for verb in (args, ["generate", "--base-model", tiny_model_dir, "--quantization", "4bit", "--instruction", "x"]):
        code, _, err = cli(capsys, *verb)
        assert code == 2 and "pip install 'bitsandbytes" in error_line(err), err
    assert not (tmp_path / "o").exists()


def test_a_gguf_base_is_quantized_again_with_a_notice(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """A GGUF base reaches lorakit dequantized (a cached HF folder): --quantization proceeds, and says so."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    converted = tmp_path / "gguf" / "model-abc"
    shutil.copytree(tiny_model_dir, converted)
    with caplog.at_level("INFO", logger="lorakit"):
        model = load_model(converted, torch.float32, quantization=qopts("4bit"))
    assert "GGUF file, dequantized to full precision" in caplog.text and model.is_loaded_in_4bit
    caplog.clear()
    with caplog.at_level("INFO", logger="lorakit"):
        check_quantized_base(tiny_model_dir, qopts("4bit"))
    assert "GGUF" not in caplog.text


def test_pretrain_on_a_4bit_base(tiny_model_dir, tmp_path, capsys):
    """pretrain trains embed_tokens/lm_head fully next to the LoRA: on a 4-bit base they stay full precision."""
    from safetensors import safe_open

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    out = tmp_path / "pt"
    code, _, err = cli(capsys, "pretrain", "--base-model", tiny_model_dir, "--data-path", text, "--output-dir", out,
                       "--quantization", "4bit", "--block-size", "32", "--batch-size", "4", "--micro-batch-size",
                       "2", "--max-steps", "1", "--precision", "fp32", "--warmup-steps", "0")
    assert code == 0, err
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert any("embed_tokens" in n and "lora" not in n for n in names)
        assert all(f.get_tensor(n).dtype == torch.float32 for n in names)


def test_serve_engine_on_a_4bit_base_answers_as_hf_generate(tmp_path_factory):
    """What `lorakit serve --quantization 4bit --lora-weights alpha=...` runs: the adapter selectable by name
    next to the base, greedy answers equal to HF generate on PEFT's model over the same 4-bit base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.config import build_config
    from lorakit.generate.params import GenerationParams
    from lorakit.generate.runner import Engine
    from lorakit.serve.config import ServeConfig
    from test_generate_helpers import hf_greedy, make_adapter, tiny_chat_model

    model_dir = tiny_chat_model(tmp_path_factory)
    alpha = make_adapter(model_dir, tmp_path_factory.mktemp("q-adapters") / "alpha", seed=3)
    engine = Engine.load(build_config(ServeConfig, dict(base_model=str(model_dir), lora_weights=[f"alpha={alpha}"],
                                                        quantization="4bit", precision="fp32")))
    assert engine.model_names == ["tiny-chat", "alpha"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(qopts("4bit"), torch.float32))
    tuned = PeftModel.from_pretrained(base, str(alpha)).eval()
    ids = list(tok("The quick brown fox")["input_ids"])
    try:
        for adapter in ("alpha", None):
            got = engine.complete(ids, GenerationParams(max_new_tokens=8, temperature=0.0), adapter=adapter).text
            if adapter:
                want = hf_greedy(tuned, tok, ids, 8)
            else:
                with tuned.disable_adapter():
                    want = hf_greedy(tuned, tok, ids, 8)
            assert got == want, adapter
    finally:
        engine.close()


def test_quantization_runs_on_the_torch_backend(tiny_model_dir):
    """bitsandbytes is a torch-side quantization: `auto` keeps torch, an explicit llamacpp is refused."""
    from lorakit.errors import ConfigError
    from lorakit.generate.backends import resolve_backend
    from lorakit.generate.config import GenerateConfig

    assert resolve_backend(GenerateConfig(base_model=str(tiny_model_dir), quantization="4bit")) == "torch"
    with pytest.raises(ConfigError, match="--gguf-type"):
        resolve_backend(GenerateConfig(base_model=str(tiny_model_dir), quantization="8bit", backend="llamacpp"))
