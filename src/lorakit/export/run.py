"""`lorakit export`: an HF model of a known family -> GGUF (native writer) or Meta pth (LLaMA/Mistral), verified."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.checkpoint.verify import VerifyResult, report_verification
from lorakit.export.config import ExportConfig

log = logging.getLogger("lorakit")


@dataclass
class ExportResult:
    """What `export_model` wrote: the output path, seconds taken, and the verification (None: skipped)."""

    output: Path
    seconds: float
    verify: VerifyResult | None = None


def export_model(model: str, fmt: str, output: str | Path, dtype: str = "f16", verify: bool = True,
                 overwrite: bool = False, imatrix: str | Path | None = None) -> ExportResult:
    """Write `model` (resolved through lorakit.models) as GGUF or pth at `output`, atomically, with its
    weights as `dtype` (precision.WEIGHT_TYPES: f32, f16, bf16; q8_0 for GGUF). Quantized GGUF types
    (export/quantize.py) are made by llama.cpp from an f16/bf16 GGUF; every type is verified layer by layer."""
    from lorakit.checkpoint.output import atomic_dir, atomic_file, copy_tokenizer, tokenizer_source
    from lorakit.export.quantize import is_quant_type
    from lorakit.models import resolve_model_dir

    start = time.perf_counter()
    src = resolve_model_dir(model)
    out = Path(output).expanduser()
    result = ExportResult(out, 0.0)
    if fmt == "gguf" and is_quant_type(dtype):
        from lorakit.export.quantize import write_quantized

        with atomic_file(out, overwrite) as tmp:
            write_quantized(src, tmp, dtype, Path(imatrix) if imatrix else None)
            if verify:
                result.verify = verify_gguf(src, tmp, dtype)
    elif fmt == "gguf":
        from lorakit.export.gguf_writer import write_gguf

        with atomic_file(out, overwrite) as tmp:
            write_gguf(src, tmp, dtype)
            if verify:
                result.verify = verify_gguf(src, tmp, dtype)
    else:
        import json

        from lorakit.checkpoint.pth import write_pth
        from lorakit.formats.safetensors_io import SafetensorsFolder, iter_tensors
        from lorakit.models.families import require_meta_pth
        from lorakit.precision import torch_dtype

        require_meta_pth(src, "export --format pth")

        config = json.loads((src / "config.json").read_text())
        with atomic_dir(out, overwrite) as tmp:
            to = torch_dtype(dtype)
            tensors = ((n, t.to(to)) for n, t in iter_tensors(SafetensorsFolder(src)))
            write_pth(tensors, config, tmp)
            copy_tokenizer(tokenizer_source(None, [], src), tmp)
            if verify:
                result.verify = verify_pth(src, tmp, dtype)
    result.seconds = time.perf_counter() - start
    return result


def _vocab_rows(src: Path) -> int:
    from lorakit.formats.safetensors_io import SafetensorsFolder

    return SafetensorsFolder(src).shape("model.embed_tokens.weight")[0]


def verify_gguf(src: Path, gguf_file: Path, dtype: str) -> VerifyResult:
    """The written GGUF (any type, llama.cpp's quantizations included), read back tensor by tensor, against
    the source HF model, one decoder layer at a time (bounded memory, any model size;
    export/layerwise_verify.py)."""
    from lorakit.export.layerwise_verify import verify_gguf_layerwise

    return verify_gguf_layerwise(src, gguf_file, dtype)


def verify_pth(src: Path, folder: Path, dtype: str) -> VerifyResult:
    """The written Meta pth folder, read back tensor by tensor, against the source HF model, layer by layer."""
    from lorakit.export.layerwise_verify import verify_pth_layerwise

    return verify_pth_layerwise(src, folder, dtype)


def export_lora(adapter: str, base_model: str, output: str | Path, dtype: str = "f32", verify: bool = True,
                overwrite: bool = False) -> ExportResult:
    """Write a PEFT adapter as a GGUF LoRA (see gguf_lora.py); verified by llama.cpp applying it to an f32
    GGUF of the base, against PEFT applying it to the HF base."""
    from lorakit.checkpoint.output import atomic_file
    from lorakit.export.gguf_lora import write_gguf_lora
    from lorakit.models import resolve_adapter_dir, resolve_model_dir

    start = time.perf_counter()
    adapter_dir, base_dir = resolve_adapter_dir(adapter), resolve_model_dir(base_model)
    out = Path(output).expanduser()
    result = ExportResult(out, 0.0)
    with atomic_file(out, overwrite) as tmp:
        summary = write_gguf_lora(adapter_dir, base_dir, tmp, dtype)
        log.info("GGUF LoRA: %d adapted weights, r=%d, alpha=%g%s", summary.tensors, summary.rank, summary.alpha,
                 f" ({summary.rescaled} rescaled into B)" if summary.rescaled else "")
        if verify:
            result.verify = verify_gguf_lora(base_dir, adapter_dir, tmp, dtype)
    result.seconds = time.perf_counter() - start
    return result


def verify_gguf_lora(base_dir: Path, adapter_dir: Path, lora_gguf: Path, dtype: str) -> VerifyResult | None:
    """llama.cpp: f32 base GGUF + this adapter vs PEFT: HF base + the adapter (unmerged), fp32 (tolerance:
    the adapter type's plus llama.cpp's own error on the base, see verify_adapter_with_llamacpp)."""
    from lorakit.checkpoint.verify import merged_in_memory
    from lorakit.export.gguf_cache import cached_model_gguf
    from lorakit.export.llamacpp_verify import verify_adapter_with_llamacpp
    from lorakit.formats.safetensors_io import param_count

    base_gguf = cached_model_gguf(base_dir, "f32")
    return verify_adapter_with_llamacpp(f"GGUF LoRA {dtype}", param_count(base_dir), _vocab_rows(base_dir),
                                        base_gguf, dtype, adapter_gguf=lora_gguf,
                                        reference=lambda dtype: merged_in_memory(str(base_dir), [str(adapter_dir)],
                                                                                 dtype))


def make_imatrix(cfg: ExportConfig) -> Path:
    """--imatrix-data: the importance matrix of --model on that text (export/imatrix.py), saved beside the
    output as `<output>.imatrix.gguf`."""
    from lorakit.checkpoint.output import atomic_file
    from lorakit.errors import OutputExistsError
    from lorakit.export.imatrix import compute_imatrix
    from lorakit.models import resolve_model_dir

    out = Path(cfg.output).expanduser()
    if out.exists() and not cfg.overwrite:  # before the forward passes, not after
        raise OutputExistsError(f"output file {out} exists (pass --overwrite to replace it)")
    path = out.with_name(out.name + ".imatrix.gguf")
    with atomic_file(path, cfg.overwrite) as tmp:
        s = compute_imatrix(resolve_model_dir(cfg.model), Path(cfg.imatrix_data).expanduser(), tmp,
                            max_chunks=cfg.imatrix_chunks)
    print(f"importance matrix: {s.tensors} weights, {s.chunks} chunks x 512 tokens of {cfg.imatrix_data} -> {path}")
    return path


def run_export(cfg: ExportConfig) -> int:
    """The `lorakit export` verb: export, print the result; returns the exit code."""
    if cfg.format == "gguf-lora":
        result = export_lora(cfg.adapter, cfg.base_model, cfg.output, cfg.dtype, cfg.verify, cfg.overwrite)
        what = cfg.adapter
    else:
        imatrix = cfg.imatrix or (make_imatrix(cfg) if cfg.imatrix_data else None)
        result = export_model(cfg.model, cfg.format, cfg.output, cfg.dtype, cfg.verify, cfg.overwrite, imatrix)
        what = cfg.model
    print(f"exported {what} -> {result.output} ({cfg.format}, {cfg.dtype}) in {result.seconds:.1f}s")
    if cfg.ollama:
        from lorakit.export.ollama import write_modelfile_for

        modelfile = write_modelfile_for(cfg, result.output,
                                        lambda base, out: export_model(str(base), "gguf", out, "f16"))
        print(f"Ollama Modelfile: {modelfile}")
    report_verification(result.verify, cfg.verify)
    return 0
