"""`lorakit export`: an HF LLaMA model -> GGUF (native writer) or Meta pth, verified by logits."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.export.config import ExportConfig
from lorakit.export.verify import VerifyResult

log = logging.getLogger("lorakit")


@dataclass
class ExportResult:
    output: Path
    seconds: float
    verify: VerifyResult | None = None


def export_model(model: str, fmt: str, output: str | Path, outtype: str = "f16", verify: bool = True,
                 overwrite: bool = False, imatrix: str | Path | None = None) -> ExportResult:
    """Write `model` (resolved through lorakit.models) as GGUF or pth at `output`, atomically.
    Quantized GGUF types (see export/quantize.py) are made by llama.cpp and verified through it."""
    from lorakit.export.quantize import is_quant_type
    from lorakit.merge.output import atomic_dir, atomic_file, copy_tokenizer, tokenizer_source
    from lorakit.models import resolve_model_dir

    start = time.perf_counter()
    src = resolve_model_dir(model)
    out = Path(output).expanduser()
    result = ExportResult(out, 0.0)
    if fmt == "gguf" and is_quant_type(outtype):
        from lorakit.export.quantize import verify_quantized, write_quantized

        with atomic_file(out, overwrite) as tmp:
            write_quantized(src, tmp, outtype, Path(imatrix) if imatrix else None)
            if verify:
                result.verify = verify_quantized(src, tmp, outtype)
    elif fmt == "gguf":
        from lorakit.export.gguf_writer import write_gguf

        with atomic_file(out, overwrite) as tmp:
            write_gguf(src, tmp, outtype)
            if verify:
                result.verify = verify_gguf(src, tmp, outtype)
    else:
        import json

        from lorakit.export.pth import write_pth
        from lorakit.merge.safetensors_io import SafetensorsFolder, iter_tensors

        config = json.loads((src / "config.json").read_text())
        with atomic_dir(out, overwrite) as tmp:
            tensors = iter_tensors(SafetensorsFolder(src))
            if outtype in ("f32", "f16", "bf16"):
                import torch

                dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[outtype]
                tensors = ((n, t.to(dtype)) for n, t in tensors)
            write_pth(tensors, config, tmp)
            copy_tokenizer(tokenizer_source(None, [], src), tmp)
            if verify:
                result.verify = verify_pth(src, tmp, outtype)
    result.seconds = time.perf_counter() - start
    return result


def _vocab_rows(src: Path) -> int:
    from lorakit.merge.safetensors_io import SafetensorsFolder

    return SafetensorsFolder(src).shape("model.embed_tokens.weight")[0]


def verify_gguf(src: Path, gguf_file: Path, outtype: str) -> VerifyResult | None:
    """Logits of transformers' own GGUF loader on the written file vs the source HF model."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.export.verify import round_trip
    from lorakit.merge.safetensors_io import param_count
    from lorakit.models import load_model

    return round_trip(f"GGUF {outtype}", param_count(src), _vocab_rows(src), outtype,
                      reference=lambda dtype: load_model(src, dtype),
                      written=lambda dtype: AutoModelForCausalLM.from_pretrained(
                          gguf_file.parent, gguf_file=gguf_file.name, dtype=getattr(torch, dtype)))


def verify_pth(src: Path, folder: Path, outtype: str) -> VerifyResult | None:
    """Logits of lorakit's pth reader on the written folder vs the source HF model."""
    import torch

    from lorakit.export.pth import load_pth_model
    from lorakit.export.verify import round_trip
    from lorakit.merge.safetensors_io import param_count
    from lorakit.models import load_model

    return round_trip("pth", param_count(src), _vocab_rows(src), {"bf16": "bf16", "f16": "f16"}.get(outtype, "f32"),
                      reference=lambda dtype: load_model(src, dtype),
                      written=lambda dtype: load_pth_model(folder, getattr(torch, dtype)))


def export_lora(adapter: str, base_model: str, output: str | Path, outtype: str = "f32", verify: bool = True,
                overwrite: bool = False) -> ExportResult:
    """Write a PEFT adapter as a GGUF LoRA (see gguf_lora.py); verified by llama.cpp applying it to an f32
    GGUF of the base, against PEFT applying it to the HF base."""
    from lorakit.export.gguf_lora import write_gguf_lora
    from lorakit.merge.output import atomic_file
    from lorakit.models import resolve_adapter_dir, resolve_model_dir

    start = time.perf_counter()
    adapter_dir, base_dir = resolve_adapter_dir(adapter), resolve_model_dir(base_model)
    out = Path(output).expanduser()
    result = ExportResult(out, 0.0)
    with atomic_file(out, overwrite) as tmp:
        summary = write_gguf_lora(adapter_dir, base_dir, tmp, outtype)
        log.info("GGUF LoRA: %d adapted weights, r=%d, alpha=%g%s", summary.tensors, summary.rank, summary.alpha,
                 f" ({summary.rescaled} rescaled into B)" if summary.rescaled else "")
        if verify:
            result.verify = verify_gguf_lora(base_dir, adapter_dir, tmp, outtype)
    result.seconds = time.perf_counter() - start
    return result


def verify_gguf_lora(base_dir: Path, adapter_dir: Path, lora_gguf: Path, outtype: str) -> VerifyResult | None:
    """llama.cpp: f32 base GGUF + this adapter vs PEFT: HF base + the adapter (unmerged), fp32."""
    from lorakit.export.gguf_cache import cached_model_gguf
    from lorakit.export.llamacpp_verify import verify_with_llamacpp
    from lorakit.export.verify import merged_in_memory
    from lorakit.merge.safetensors_io import param_count

    base_gguf = cached_model_gguf(base_dir, "f32")
    return verify_with_llamacpp(f"GGUF LoRA {outtype}", param_count(base_dir), _vocab_rows(base_dir), base_gguf,
                                outtype, reference=lambda dtype: merged_in_memory(str(base_dir), [str(adapter_dir)],
                                                                                  dtype),
                                adapters={"adapter": lora_gguf})


def run_export(cfg: ExportConfig) -> int:
    if cfg.format == "gguf-lora":
        result = export_lora(cfg.adapter, cfg.base_model, cfg.output, cfg.outtype, cfg.verify, cfg.overwrite)
        what = cfg.adapter
    else:
        result = export_model(cfg.model, cfg.format, cfg.output, cfg.outtype, cfg.verify, cfg.overwrite, cfg.imatrix)
        what = cfg.model
    print(f"exported {what} -> {result.output} ({cfg.format}, {cfg.outtype}) in {result.seconds:.1f}s")
    if cfg.ollama:
        from lorakit.export.ollama import write_modelfile_for

        print(f"Ollama Modelfile: {write_modelfile_for(cfg, result.output)}")
    if result.verify is not None:
        print(f"verify: {result.verify.summary()}")
    elif cfg.verify:
        print("verify: skipped, the model does not fit in memory (see the warning above)")
    return 0
