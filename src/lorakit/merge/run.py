"""`lorakit merge`: base + LoRA adapters (in order) -> merged HF safetensors or Meta pth, verified."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.checkpoint.output import atomic_dir, check_output_dir, copy_tokenizer, has_tokenizer, tokenizer_source
from lorakit.checkpoint.verify import report_verification
from lorakit.formats.shard_writer import StreamingShardWriter, parse_size
from lorakit.merge.config import MergeConfig
from lorakit.merge.streaming import iter_merged, plan_merge, write_merged

if TYPE_CHECKING:
    from lorakit.checkpoint.verify import VerifyResult

log = logging.getLogger("lorakit")


@dataclass
class AdapterMergeResult:
    """What merging LoRA adapters into a base model wrote (`merge_model`, the `lorakit merge` verb)."""

    output_dir: Path
    files: list[str]
    vocab_size: int
    seconds: float
    verify: VerifyResult | None = None


def merge_model(base_model: str, adapters: list[str], output_dir: str | Path, output_type: str = "huggingface",
                dtype: str = "auto", max_shard_size: str = "2GB", tokenizer: str | None = None,
                verify: bool = True, overwrite: bool = False) -> AdapterMergeResult:
    """Merge `adapters` into `base_model` tensor by tensor and write `output_dir` atomically."""
    from tqdm import tqdm

    from lorakit.models import check_vocab_rows, load_tokenizer, resolve_adapter_dir, resolve_model_dir
    from lorakit.models.quantize import refuse_quantized_merge_base

    start = time.perf_counter()
    out = Path(output_dir).expanduser()
    check_output_dir(out, overwrite)  # fail before any work
    base_dir = resolve_model_dir(base_model)
    refuse_quantized_merge_base(base_dir)  # a bitsandbytes checkpoint: merge into the original weights
    if output_type == "pth":
        from lorakit.models.families import require_meta_pth

        require_meta_pth(base_dir, "merge --output-type pth")
    adapter_dirs = [resolve_adapter_dir(a) for a in adapters]
    plan = plan_merge(base_dir, adapter_dirs, dtype)
    tok_source: Path | None = tokenizer_source(tokenizer, adapter_dirs, base_dir)
    if tok_source is not None and (tokenizer or has_tokenizer(tok_source)):
        tok = load_tokenizer(base_dir, tok_source, add_pad_token=False)
        check_vocab_rows(len(tok), plan.vocab_size, what=f"the merged model (tokenizer from {tok_source})")
    else:
        log.warning("no tokenizer in the base model or the adapters: the merged model gets none")
        tok_source = None
    log.info("merging %d adapter(s) into %s: %d tensors, vocab %d", len(adapter_dirs), base_dir,
             len(plan.tensors), plan.vocab_size)

    try:
        with atomic_dir(out, overwrite) as tmp:
            bar = {"total": len(plan.tensors), "desc": "merging", "unit": "tensor", "leave": False}
            if output_type == "pth":
                from lorakit.checkpoint.pth import write_pth

                files = write_pth(tqdm(iter_merged(plan), **bar), plan.config, tmp)
            else:
                writer = StreamingShardWriter(tmp, plan.tensors, parse_size(max_shard_size))
                try:
                    with tqdm(**bar) as progress:
                        files = write_merged(plan, writer, progress.update)
                finally:
                    writer.close()
                (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
                if (base_dir / "generation_config.json").is_file():
                    shutil.copy2(base_dir / "generation_config.json", tmp / "generation_config.json")
            if tok_source is not None:
                copy_tokenizer(tok_source, tmp)
            result = AdapterMergeResult(out, files, plan.vocab_size, 0.0)
            if verify:
                stored = {t.dtype for t in plan.tensors}  # tolerance of the least precise type written
                loosest = next((d for d in ("BF16", "F16", "F32") if d in stored), plan.tensors[0].dtype)
                result.verify = verify_merge(str(base_dir), [str(d) for d in adapter_dirs], tmp, output_type,
                                             loosest, plan.vocab_size, plan.config)
    finally:
        plan.close()
    result.seconds = time.perf_counter() - start
    return result


def verify_merge(base_model: str, adapters: list[str], folder: Path, output_type: str, st_dtype: str,
                 vocab_size: int, config: dict | None = None):
    """The written model vs base + adapters computed apart from the merge (merge/reference.py), compared
    layer by layer (checkpoint/layerwise.py): the memory of one decoder layer, whatever the model size."""
    from lorakit.checkpoint.layerwise import FolderSource, verify_layerwise
    from lorakit.checkpoint.weight_sources import PthWeights
    from lorakit.merge.reference import MergeReference
    from lorakit.precision import weight_type

    if config is None:
        config = json.loads((folder / "config.json").read_text())
    reference = MergeReference(base_model, adapters)
    written = PthWeights(folder, config) if output_type == "pth" else FolderSource(folder)
    try:
        return verify_layerwise(f"merged model ({output_type})", config, reference, written,
                                weight_type(st_dtype).name, vocab_size)
    finally:
        reference.close()
        written.close()


def run_merge(cfg: MergeConfig) -> int:
    """The `lorakit merge` verb: merge, print the result; returns the exit code."""
    result = merge_model(cfg.base_model, cfg.lora_weights, cfg.output_dir, cfg.output_type, cfg.dtype,
                         cfg.max_shard_size, cfg.tokenizer, cfg.verify, cfg.overwrite)
    print(f"merged {len(cfg.lora_weights)} adapter(s) into {result.output_dir} "
          f"({len(result.files)} weight file(s), vocab {result.vocab_size}) in {result.seconds:.1f}s")
    report_verification(result.verify, cfg.verify)
    return 0
