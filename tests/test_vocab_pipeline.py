"""End to end, as a user runs it: vocab train -> vocab merge -> pretrain (larger vocab) -> merge ->
load and generate -> instruction-tune on top. The merged model's logits equal PEFT's own forward
and merge of the same adapter."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from lorakit.cli import main


def lorakit(*args: str) -> str:
    """Run `lorakit ARGS` in this process (as the console script does) and return what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 0, f"lorakit {' '.join(args)} exited {exit_info.value.code}:\n{out.getvalue()}"
    return out.getvalue()


@pytest.fixture(scope="module")
def pipeline(data_dir, tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline")
    zh = json.loads((data_dir / "alpaca_zh_demo.json").read_text())
    corpus = work / "zh.txt"  # raw Chinese text, one document a line
    corpus.write_text("\n".join(r["output"].replace("\n", " ") for r in zh[:300]), encoding="utf-8")

    out = lorakit("vocab", "train", "--input", str(data_dir / "alpaca_zh_demo.json"), "--vocab-size", "3000",
                  "--output", str(work / "zh.model"), "--max-sentences", "1500")
    assert "3000 pieces" in out
    report = lorakit("vocab", "merge", "--base-tokenizer", str(data_dir / "llama_style_bpe_16k.model"),
                     "--extra-sp-model", str(work / "zh.model"), "--output-dir", str(work / "tokenizer"),
                     "--sample-text", str(corpus), "--max-sample-lines", "100")
    assert "same ids as before" in report
    out = lorakit("pretrain", "--base-model", str(tiny_model_dir), "--tokenizer", str(work / "tokenizer"),
                  "--data-path", str(corpus), "--output-dir", str(work / "pt"), "--block-size", "64",
                  "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "3", "--warmup-steps", "0",
                  "--learning-rate", "1e-2", "--precision", "fp32", "--lora-target-modules", "q_proj,v_proj",
                  "--save-steps", "100")
    assert "done: 3 steps" in out
    lorakit("merge", "--base-model", str(tiny_model_dir), "--lora-weights", str(work / "pt"), "--output-dir",
            str(work / "merged"))
    return work, report


def test_merge_report_numbers(pipeline):
    _, report = pipeline
    han = next(line for line in report.splitlines() if line.startswith("Han"))
    before, after = (float(v) for v in han.split()[2:4])
    assert before / after >= 2.0, han
    assert "round trip decode(encode(x)) == x, tokenizer.model: 100/100" in report


def test_merged_model_matches_peft(pipeline, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.models import adapter_vocab_size, load_model_and_tokenizer

    work, _ = pipeline
    model, tok = load_model_and_tokenizer(str(work / "merged"))
    n_tok = len(tok)
    assert n_tok == len(json.loads((work / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    assert model.config.vocab_size == n_tok == adapter_vocab_size(work / "pt") > 16000
    # the SentencePiece model travels with the adapter to the merged model, matching it
    sp = spm.SentencePieceProcessor(model_file=str(work / "merged" / "tokenizer.model"))
    assert sp.get_piece_size() == n_tok
    assert sp.encode("北京 is 2024") == tok.encode("北京 is 2024", add_special_tokens=False)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.resize_token_embeddings(n_tok)  # rows are replaced by the adapter's full embed_tokens / lm_head
    peft_model = PeftModel.from_pretrained(base, str(work / "pt")).eval()
    text = "中国的首都是北京。The capital of China is Beijing, 2024."
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.max() >= 16000  # new pieces are used
    with torch.no_grad():
        merged_logits = model.eval()(ids).logits
        peft_logits = peft_model(ids).logits
        peft_merged = peft_model.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_logits, peft_merged, atol=1e-5, rtol=1e-5)
    # the new rows were trained: no longer the mean of the old ones they started from
    emb = model.get_input_embeddings().weight
    assert not torch.allclose(emb[16000:].mean(0), emb[:16000].mean(0), atol=1e-4)

    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 5 or int(gen[0, -1]) == tok.eos_token_id
    assert isinstance(tok.decode(gen[0, ids.shape[1]:]), str)


def test_instruction_tuning_on_top(pipeline, data_dir):
    work, _ = pipeline
    data = work / "sft.json"
    data.write_text(json.dumps(json.loads((data_dir / "alpaca_zh_demo.json").read_text())[:16],
                               ensure_ascii=False))
    out = lorakit("finetune", "--base-model", str(work / "merged"), "--tokenizer", str(work / "tokenizer"),
                  "--data-path", str(data), "--output-dir", str(work / "sft"), "--batch-size", "4",
                  "--micro-batch-size", "4", "--max-steps", "1", "--val-set-size", "0", "--precision", "fp32",
                  "--cutoff-len", "64", "--prompt-template", "chinese_alpaca")
    assert "done: 1 steps" in out
    assert Path(work / "sft" / "adapter_model.safetensors").is_file()
