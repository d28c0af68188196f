"""`lorakit export`: an HF model of a known family -> GGUF (native writer) or Meta pth (LLaMA/Mistral), verified."""

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
                 overwrite: bool = False) -> ExportResult:
    """Write `model` (resolved through lorakit.models) as GGUF or pth at `output`, atomically."""
    from lorakit.merge.output import atomic_dir, atomic_file, copy_tokenizer, tokenizer_source
    from lorakit.models import resolve_model_dir

    start = time.perf_counter()
    src = resolve_model_dir(model)
    out = Path(output).expanduser()
    result = ExportResult(out, 0.0)
    if fmt == "gguf":
        from lorakit.export.gguf_writer import write_gguf

        with atomic_file(out, overwrite) as tmp:
            write_gguf(src, tmp, outtype)
            if verify:
                result.verify = verify_gguf(src, tmp, outtype)
    else:
        import json

        from lorakit.export.pth import write_pth
        from lorakit.models.families import require_meta_pth

        require_meta_pth(src, "export --format pth")
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
    """Logits of an independent reader of the written file (transformers' GGUF loader, or llama.cpp for the
    families that loader does not rebuild exactly: export/gguf_readers.py) vs the source HF model."""
    from lorakit.export.gguf_readers import gguf_reader
    from lorakit.export.verify import round_trip
    from lorakit.merge.safetensors_io import param_count
    from lorakit.models import load_model

    reader = gguf_reader(src, gguf_file)
    if reader is None:
        return None
    name, written = reader
    return round_trip(f"GGUF {outtype} (read by {name})", param_count(src), _vocab_rows(src), outtype,
                      reference=lambda dtype: load_model(src, dtype), written=written)


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


def run_export(cfg: ExportConfig) -> int:
    result = export_model(cfg.model, cfg.format, cfg.output, cfg.outtype, cfg.verify, cfg.overwrite)
    print(f"exported {cfg.model} -> {result.output} ({cfg.format}, {cfg.outtype}) in {result.seconds:.1f}s")
    if result.verify is not None:
        print(f"verify: {result.verify.summary()}")
    elif cfg.verify:
        print("verify: skipped (see the warning above: too large for memory, or no faithful GGUF reader)")
    return 0
