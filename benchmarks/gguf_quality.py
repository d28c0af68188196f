"""Quality of each GGUF type: perplexity on held-out text next to f16, file size, and the logit error
`export --verify` measures (llama.cpp on the file vs the fp32 HF model, relative to max |logit|).

Perplexity: llama.cpp's logits on consecutive windows of data/wiki_demo.txt (lorakit eval --backend
llamacpp computes the same), and the fp32 HF model on the same windows as the reference. With
`--imatrix-data` (default data/c4_demo.jsonl: other text than the held-out wiki_demo.txt) each quantized
type is measured again with the importance matrix `export --imatrix-data` computes (rows `TYPE+imat`).
Run:
    .venv/bin/python benchmarks/gguf_quality.py [--base-model smollm2-135m] [--windows 24] [--window 512]
        [--imatrix-data data/c4_demo.jsonl] [--imatrix-chunks 40] [--no-imatrix]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TYPES = ["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_1", "q5_0", "q4_k_m", "q4_1", "q4_0"]
DATA = Path(__file__).resolve().parents[1] / "data" / "wiki_demo.txt"
CALIBRATION = Path(__file__).resolve().parents[1] / "data" / "c4_demo.jsonl"


def hf_perplexity(model_dir: Path, windows: list[list[int]]) -> float:
    import torch

    from lorakit.models import load_model

    model = load_model(model_dir, "float32").eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            logits = model(input_ids=torch.tensor([w])).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
            count += len(w) - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=24, help="number of text windows scored")
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--imatrix-data", default=str(CALIBRATION), help="calibration text for the imatrix rows")
    parser.add_argument("--imatrix-chunks", type=int, default=40, help="chunks of 512 tokens for the imatrix")
    parser.add_argument("--no-imatrix", action="store_true", help="skip the imatrix rows")
    args = parser.parse_args()

    from lorakit.data import read_text_documents
    from lorakit.export.imatrix import compute_imatrix
    from lorakit.export.llamacpp_verify import verify_with_llamacpp
    from lorakit.export.quantize import is_quant_type
    from lorakit.export.run import export_model
    from lorakit.formats.safetensors_io import SafetensorsFolder, param_count
    from lorakit.models import load_model, load_tokenizer, resolve_model_dir
    from lorakit.train.evaluate_llamacpp import llamacpp_text_loss, text_windows

    model_dir = resolve_model_dir(args.base_model)
    vocab = SafetensorsFolder(model_dir).shape("model.embed_tokens.weight")[0]

    def reference_model(dtype: str):
        return load_model(model_dir, dtype)

    tok = load_tokenizer(model_dir, add_pad_token=False)
    ids: list[int] = []
    for doc in read_text_documents(DATA):
        ids += tok(doc, add_special_tokens=False)["input_ids"]
        if len(ids) > args.windows * args.window * 2:
            break
    # held-out: the windows come from the end of what was read, away from the file's first lines
    windows = text_windows(ids, args.window)[-args.windows:]
    reference = hf_perplexity(model_dir, windows)
    print(f"{args.base_model}: {len(windows)} windows x {args.window} tokens of {DATA.name}; "
          f"HF fp32 perplexity {reference:.3f}")
    print(f"{'type':12}{'size MB':>9}{'rel. logit err':>16}{'perplexity':>12}{'vs f16':>9}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        imatrix = None
        if not args.no_imatrix:
            imatrix = Path(tmp) / "imatrix.gguf"
            s = compute_imatrix(model_dir, Path(args.imatrix_data), imatrix, max_chunks=args.imatrix_chunks)
            print(f"imatrix: {s.chunks} chunks x 512 tokens of {Path(args.imatrix_data).name}", flush=True)
        runs = [(t, None) for t in args.types.split(",")]
        runs += [(f"{t}+imat", imatrix) for t, _ in list(runs) if imatrix is not None and is_quant_type(t)]
        for t, im in runs:
            out = Path(tmp) / f"m-{t}.gguf"
            export_model(str(model_dir), "gguf", out, t.split("+")[0], verify=False, imatrix=im)
            v = verify_with_llamacpp(t, param_count(model_dir), vocab, out, "f32", reference=reference_model,
                                     tolerance=float("inf"))  # measured here, not checked
            err = v.max_abs_diff / max(v.max_abs_logit, 1.0)
            loss, _ = llamacpp_text_loss(out, {}, windows)
            rows[t] = math.exp(loss)
            base = rows.get("f16", rows[t])
            print(f"{t:12}{out.stat().st_size / 1e6:>9.1f}{err:>16.4f}{rows[t]:>12.3f}{rows[t] / base - 1:>+9.1%}",
                  flush=True)
            out.unlink()
    for t in ("q4_k_m", "q4_k_m+imat"):
        if t in rows and "f16" in rows:
            print(f"{t} perplexity within {rows[t] / rows['f16'] - 1:+.1%} of f16 (target: within 5%)")


if __name__ == "__main__":
    main()
