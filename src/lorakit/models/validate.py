"""Check a model folder and its tokenizer before anything heavy reads them: one clear line per problem.

`validate_model_dir` runs where a model is resolved (models/resolve.py), `validate_tokenizer` where a
tokenizer is loaded (models/load.py); adapters are checked in adapter_check.py. Everything here reads
headers and small JSON files only (milliseconds), so a damaged download is refused before torch loads
a weight or a verb creates an output. Errors are `DamagedFileError` (exit 2) naming the file.
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path
from typing import Any

from lorakit.errors import DamagedFileError
from lorakit.models.headers import REDOWNLOAD, nonempty_size, safetensors_header

INDEX_NAME, SINGLE_NAME = "model.safetensors.index.json", "model.safetensors"
# config.json fields every causal LM family lorakit handles has (in text_config for multimodal ones)
_REQUIRED_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_INTS = ("num_key_value_heads", "intermediate_size", "max_position_embeddings", "head_dim")


def read_json_object(path: Path, what: str, advice: str = REDOWNLOAD) -> dict[str, Any]:
    """The JSON object in `path` (`what` names the kind of file for the message)."""
    nonempty_size(path, what)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise DamagedFileError(path, f"not {what}: not UTF-8 text", advice) from None
    except json.JSONDecodeError as e:
        raise DamagedFileError(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", advice) from None
    if not isinstance(data, dict):
        raise DamagedFileError(path, f"not {what}: a JSON {type(data).__name__}, not an object", advice)
    return data


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def field_error(path: Path, name: str, value: Any, expected: str, advice: str) -> DamagedFileError:
    if value is None:
        return DamagedFileError(path, f"field {name!r} is missing", advice)
    return DamagedFileError(path, f"field {name!r} must be {expected}, got {value!r}", advice)


def check_model_config(path: Path) -> dict[str, Any]:
    """The text-model part of config.json, with the fields every supported family needs, typed."""
    advice = "restore config.json from the model's download"
    config = read_json_object(path, "a model config.json", advice)
    if not isinstance(config.get("model_type"), str):
        raise field_error(path, "model_type", config.get("model_type"), "a string such as 'llama'", advice)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for name in _REQUIRED_INTS + _OPTIONAL_INTS:
        value = text.get(name)
        if (name in _REQUIRED_INTS or value is not None) and not (is_int(value) and value > 0):
            raise field_error(path, name, value, "a positive integer", advice)
    if "tie_word_embeddings" in text and not isinstance(text["tie_word_embeddings"], bool):
        raise field_error(path, "tie_word_embeddings", text["tie_word_embeddings"], "true or false", advice)
    for name in ("rms_norm_eps", "rope_theta"):
        if name in text and text[name] is not None and not is_number(text[name]):
            raise field_error(path, name, text[name], "a number", advice)
    return text


def weight_shapes(folder: Path) -> dict[str, list[int]] | None:
    """{tensor name: shape} of the folder's safetensors weights, every file checked; None for a
    folder with PyTorch .bin weights only (checked to be zip archives, as torch.save writes them)."""
    files = weight_files(folder)
    return None if files is None else {name: shape for name, (_, shape) in files.items()}


def weight_files(folder: Path) -> dict[str, tuple[Path, list[int]]] | None:
    """{tensor name: (file, shape)}: `weight_shapes` with the file each tensor is in."""
    index = folder / INDEX_NAME
    if index.is_file():
        data = read_json_object(index, "a safetensors index")
        weight_map = data.get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
            raise DamagedFileError(index, "field 'weight_map' must be a non-empty object of tensor name -> file",
                                   REDOWNLOAD)
        shapes: dict[str, tuple[Path, list[int]]] = {}
        for fname in sorted(set(weight_map.values())):
            shard = folder / fname
            if not shard.is_file():
                raise DamagedFileError(index, f"names the shard {shard}, which is missing",
                                       "download the missing shard")
            shapes.update({n: (shard, s) for n, (_, s) in safetensors_header(shard).items()})
        for name, fname in weight_map.items():
            if name not in shapes:
                raise DamagedFileError(folder / fname, f"lacks tensor {name!r} that {INDEX_NAME} places in it",
                                       REDOWNLOAD)
        return shapes
    if (folder / SINGLE_NAME).exists():
        return {n: (folder / SINGLE_NAME, s) for n, (_, s) in safetensors_header(folder / SINGLE_NAME).items()}
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        for b in bins:
            nonempty_size(b, "a PyTorch weights file")
            if not zipfile.is_zipfile(b):
                raise DamagedFileError(b, "not a PyTorch weights file (not a zip archive)", REDOWNLOAD)
        return None
    raise DamagedFileError(folder / SINGLE_NAME, f"missing: {folder} has a config.json but no weights "
                                                 f"({SINGLE_NAME} or {INDEX_NAME})", REDOWNLOAD)


def expected_shapes(config: dict[str, Any]) -> dict[str, list[int]]:
    """Shape of each LLaMA-like weight (by the last parts of its name) that config.json implies."""
    hidden, vocab, heads = config["hidden_size"], config["vocab_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, (config.get("num_key_value_heads") or heads) * head_dim
    shapes = {"embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden], "norm.weight": [hidden],
              "input_layernorm.weight": [hidden], "post_attention_layernorm.weight": [hidden],
              "q_proj.weight": [q, hidden], "k_proj.weight": [kv, hidden], "v_proj.weight": [kv, hidden],
              "o_proj.weight": [hidden, q]}
    inter = config.get("intermediate_size")
    if isinstance(inter, int):
        shapes.update({"gate_proj.weight": [inter, hidden], "up_proj.weight": [inter, hidden],
                       "down_proj.weight": [hidden, inter]})
    return shapes


def check_shapes_match_config(files: dict[str, tuple[Path, list[int]]], config: dict[str, Any]) -> None:
    """The weights have the shapes config.json implies (hidden, vocabulary, heads, MLP sizes). Quantized
    checkpoints (a `quantization_config`: bitsandbytes, GPTQ...) store packed tensors of other shapes."""
    if config.get("quantization_config"):
        return
    expected = expected_shapes(config)
    for name, (path, shape) in files.items():
        if any(part.startswith(("vision", "audio", "multi_modal", "mm_")) for part in name.split(".")):
            continue  # a multimodal model's encoders have sizes of their own
        want = expected.get(".".join(name.split(".")[-2:]))
        if want is not None and shape != want:
            raise DamagedFileError(path, f"tensor {name} has shape {shape} but config.json implies {want}",
                                   "the weights and config.json come from different models; download both again")


def validate_model_dir(folder: Path) -> dict[str, list[int]] | None:
    """Check config.json, the weights' headers and the tokenizer files of an HF model folder;
    return the weights' shapes (None for .bin weights). Reads no tensor."""
    config = check_model_config(folder / "config.json")
    files = weight_files(folder)
    if files is not None:
        check_shapes_match_config(files, config)
    validate_tokenizer(folder, required=False)
    return None if files is None else {name: shape for name, (_, shape) in files.items()}


def validate_tokenizer(source: Path, required: bool = True) -> None:
    """A tokenizer folder, `tokenizer.model` or .gguf loads: each tokenizer file present is parsed by its
    own library (tokenizers, sentencepiece). With `required`, a folder must hold tokenizer files."""
    if source.is_file():
        if source.suffix == ".gguf":
            from lorakit.models.headers import gguf_header

            gguf_header(source)
        elif source.suffix == ".json":
            _check_tokenizer_json(source)
        else:
            _check_sentencepiece(source)
        return
    if not source.is_dir():
        if source.suffix in (".model", ".gguf", ".json"):  # a tokenizer file named explicitly
            nonempty_size(source, "a tokenizer file")
        return  # not found: the loader reports what it tried
    found = [n for n in ("tokenizer.json", "tokenizer.model", "vocab.json") if (source / n).is_file()]
    if required and not found:
        raise DamagedFileError(source, "holds no tokenizer (tokenizer.json or tokenizer.model)",
                               "pass --tokenizer, or copy the tokenizer files into it")
    if (source / "tokenizer.json").is_file():
        _check_tokenizer_json(source / "tokenizer.json")
    if (source / "tokenizer.model").is_file():
        _check_sentencepiece(source / "tokenizer.model")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if (source / name).is_file():
            read_json_object(source / name, f"a {name}", "restore it from the model's download")


# files already parsed by their library, by identity: a verb resolves its model several times
_PARSED: set[tuple[str, int, int, int]] = set()


def _already_parsed(path: Path) -> bool:
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _PARSED:
        return True
    _PARSED.add(key)  # removed again below if the parse fails
    return False


def _forget(path: Path) -> None:
    st = path.stat()
    _PARSED.discard((str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns))


def _check_tokenizer_json(path: Path) -> None:
    if path.is_file() and _already_parsed(path):
        return
    try:
        _parse_tokenizer_json(path)
    except DamagedFileError:
        _forget(path)
        raise


def _parse_tokenizer_json(path: Path) -> None:
    nonempty_size(path, "a tokenizer.json")
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises plain Exception; say first if it is not even JSON
        read_json_object(path, "a tokenizer.json")
        raise DamagedFileError(path, f"not a tokenizer.json the tokenizers library can read ({e})",
                               REDOWNLOAD) from None


def _check_sentencepiece(path: Path) -> None:
    if path.is_file() and _already_parsed(path):
        return
    try:
        _parse_sentencepiece(path)
    except DamagedFileError:
        _forget(path)
        raise


def _parse_sentencepiece(path: Path) -> None:
    nonempty_size(path, "a SentencePiece model")
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise DamagedFileError(path, f"not a SentencePiece model ({str(e).strip()})", REDOWNLOAD) from None
    if importlib.util.find_spec("google.protobuf") is None:  # transformers 5 reads .model through protobuf
        raise DamagedFileError(path, "reading a SentencePiece tokenizer.model needs the protobuf package",
                               "pip install protobuf")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    # pieces are serialized first, the specs after them: a file cut at a piece boundary still parses
    if not (proto.HasField("trainer_spec") and proto.HasField("normalizer_spec")):
        raise DamagedFileError(path, "truncated: a SentencePiece model without its trainer/normalizer settings",
                               REDOWNLOAD)
