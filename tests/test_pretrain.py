"""pretrain: documents -> EOS-joined stream -> blocks; vocabulary resize; loss checked independently."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.models import adapter_vocab_size, load_tokenizer
from lorakit.train.pretrain import make_blocks, tokenize_documents
from lorakit.train.pretrain_config import PretrainConfig


@pytest.fixture(scope="module")
def zh_docs(data_dir):
    records = json.loads((data_dir / "alpaca_zh_demo.json").read_text())
    return [r["output"].replace("\n", " ") for r in records[:40]]


@pytest.fixture(scope="module")
def extended_tokenizer(data_dir, tmp_path_factory):
    from lorakit.vocab.merge import merge_tokenizers

    out = tmp_path_factory.mktemp("tok") / "merged"
    merge_tokenizers(str(data_dir / "llama_style_bpe_16k.model"), str(data_dir / "chinese_sp.model"), str(out))
    return out


def test_stream_and_blocks(tiny_model_dir, zh_docs):
    tok = load_tokenizer(tiny_model_dir, add_pad_token=False)
    stream = tokenize_documents(zh_docs, tok, batch=7, show_progress=False)
    expected = []
    for doc in zh_docs:
        expected += [tok.bos_token_id, *tok.encode(doc, add_special_tokens=False), tok.eos_token_id]
    assert list(stream) == expected
    blocks = make_blocks(stream, 100)
    assert len(blocks) == len(stream) // 100
    for i, b in enumerate(blocks):
        assert b["input_ids"] == b["labels"] == expected[i * 100:(i + 1) * 100]
        assert b["attention_mask"] == [1] * 100
    assert make_blocks(stream[:99], 100) == []
    assert all(type(t) is int for t in blocks[0]["input_ids"])


def test_first_loss_equals_an_independent_forward(tiny_model_dir, extended_tokenizer, zh_docs, tmp_path):
    """Step 1's logged loss (LoRA B = 0, so the model is still the resized base) must equal a plain
    causal-LM loss over the same blocks, computed here with new rows set to the mean by hand."""
    from transformers import AutoModelForCausalLM

    from lorakit.train.pretrain import pretrain

    docs = zh_docs[:3]
    tok = load_tokenizer(tiny_model_dir, str(extended_tokenizer), add_pad_token=False)
    block = len(tokenize_documents(docs, tok, show_progress=False)) // 4  # exactly 4 blocks: one step sees all
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs), encoding="utf-8")
    cfg = PretrainConfig(base_model=str(tiny_model_dir), tokenizer=str(extended_tokenizer), data_path=str(data),
                         output_dir=str(tmp_path / "out"), block_size=block, batch_size=4, micro_batch_size=4,
                         max_steps=1, warmup_steps=0, learning_rate=1e-3, precision="fp32", modules_to_save=[],
                         logging_steps=1, save_steps=100)
    summary = pretrain(cfg)
    assert cfg.modules_to_save == ["embed_tokens", "lm_head"]  # added because the vocabulary grew
    assert adapter_vocab_size(summary.output_dir) == len(tok) > 16000
    first = json.loads((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()[0])

    blocks = make_blocks(tokenize_documents(docs, tok, show_progress=False), block)
    assert len(blocks) == 4
    ids = torch.tensor([b["input_ids"] for b in blocks])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    emb, head = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    n = len(tok)
    new_emb = torch.cat([emb, emb.mean(0, keepdim=True).expand(n - emb.shape[0], -1)])
    new_head = torch.cat([head, head.mean(0, keepdim=True).expand(n - head.shape[0], -1)])
    hidden = model.model(inputs_embeds=new_emb[ids]).last_hidden_state
    logits = hidden @ new_head.T
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, n), ids[:, 1:].reshape(-1))
    assert first["step"] == 1 and first["loss"] == pytest.approx(loss.item(), rel=1e-4)


def test_cli_errors(tiny_model_dir, tmp_path, capsys):
    from lorakit.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(["pretrain", "--base-model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"), *args])
        return e.value.code, capsys.readouterr().err

    short = tmp_path / "short.txt"
    short.write_text("only a few words\n")
    code, err = run("--data-path", str(short), "--block-size", "512")
    assert code == 2 and "fewer than --block-size 512" in err and "Traceback" not in err
    code, err = run("--data-path", str(tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt" in err
    code, err = run("--data-path", str(short), "--block-size", "4")
    assert code == 2 and "--block-size must be at least 8" in err
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()
