"""An Ollama `Modelfile` for an exported GGUF: FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER stop/defaults.

The TEMPLATE is Go template text built from the prompt template lorakit uses for the model:
- alpaca-style templates: the no-input prompt with `{{ .Prompt }}` for the instruction;
- chat templates (the tokenizer's Jinja): each role's prefix and the end-of-turn are read off renders
  of marker messages, giving a `{{ range .Messages }}` template; a default system prompt the Jinja
  template inserts becomes `SYSTEM`. The result is checked by rendering it (`render_go_template`, the
  subset written here) against the Jinja template on a probe conversation; if they differ, no
  TEMPLATE is written (Ollama then reads the chat template stored in the GGUF) and a warning says so.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.files import write_atomic

log = logging.getLogger("lorakit")
_S, _U, _A = "\x02", "\x00", "\x01"


def alpaca_go_template(template: Any) -> str:
    head = template.prompt_no_input
    if "{{" in head or "}}" in head:
        raise ValueError("template text contains '{{' or '}}'")
    return head.replace("{instruction}", "{{ .Prompt }}")


def _render(tokenizer: Any, messages: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def chat_go_template(tokenizer: Any) -> tuple[str, str | None]:
    """(Go template, default system prompt or None) equivalent to the tokenizer's chat template."""
    full = _render(tokenizer, [{"role": "system", "content": _S}, {"role": "user", "content": _U},
                               {"role": "assistant", "content": _A}], gen=False)
    gen = _render(tokenizer, [{"role": "system", "content": _S}, {"role": "user", "content": _U}], gen=True)
    i_s, i_u, i_a = full.index(_S), full.index(_U), full.index(_A)
    suffix = full[i_a + 1:]
    if not suffix or not full[i_s + 1:i_u].startswith(suffix) or not full[i_u + 1:i_a].startswith(suffix):
        raise ValueError("messages do not end with one common end-of-turn")
    sys_pre = full[:i_s]
    bos = getattr(tokenizer, "bos_token", None) or ""
    if bos and sys_pre.startswith(bos):
        sys_pre = sys_pre[len(bos):]  # llama.cpp/Ollama add BOS themselves
    user_pre = full[i_s + 1:i_u][len(suffix):]
    asst_pre = full[i_u + 1:i_a][len(suffix):]
    header = gen[gen.index(_U) + 1:]
    if not header.startswith(suffix):
        raise ValueError("unexpected generation prompt")
    header = header[len(suffix):]
    for part in (sys_pre, user_pre, asst_pre, suffix, header):
        if "{{" in part or "}}" in part:
            raise ValueError("template text contains '{{' or '}}'")
    # a default system prompt the Jinja template adds when the conversation has none
    alone = _render(tokenizer, [{"role": "user", "content": _U}], gen=True)
    lead = alone[:alone.index(user_pre + _U)] if user_pre + _U in alone else ""
    if bos and lead.startswith(bos):
        lead = lead[len(bos):]
    system = None
    if lead:
        if not (lead.startswith(sys_pre) and lead.endswith(suffix)):
            raise ValueError("cannot read the default system prompt")
        system = lead[len(sys_pre):len(lead) - len(suffix)]

    def turn(pre: str) -> str:
        return pre + "{{ .Content }}" + suffix

    go = ('{{ range .Messages }}{{ if eq .Role "system" }}' + turn(sys_pre)
          + '{{ else if eq .Role "user" }}' + turn(user_pre)
          + '{{ else if eq .Role "assistant" }}' + turn(asst_pre) + "{{ end }}{{ end }}" + header)
    return go, system


_TOKEN = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.S)


def render_go_template(template: str, messages: list[dict[str, str]] | None = None, prompt: str = "") -> str:
    """Render the Go template subset lorakit writes: `.Prompt`, `range .Messages` with `.Role`/`.Content`,
    `if/else if eq .Role "x"`, `end`."""
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        parts.append(("text", template[pos:m.start()]))
        parts.append(("action", m.group(1)))
        pos = m.end()
    parts.append(("text", template[pos:]))

    def run(i: int, message: dict[str, str] | None, out: list[str], active: bool) -> int:
        """Evaluate from part i until an unmatched `end`/`else`; returns the index of that part."""
        while i < len(parts):
            kind, value = parts[i]
            if kind == "text":
                if active:
                    out.append(value)
            elif value == ".Prompt":
                out.append(prompt if active else "")
            elif value == ".Content":
                out.append(message["content"] if active and message else "")
            elif value == "range .Messages":
                start = i + 1
                end = i
                for msg in (messages or []) if active else []:
                    end = run(start, msg, out, True)
                if not (active and messages):
                    end = run(start, None, [], False)
                i = end
            elif value.startswith("if "):
                i = _branches(i, message, out, active, run)
                continue
            elif value == "end" or value.startswith("else"):
                return i
            else:
                raise ValueError(f"unsupported template action {{{{ {value} }}}}")
            i += 1
        return i

    def _branches(i, message, out, active, run_fn) -> int:
        taken = False
        while True:
            cond = parts[i][1]
            cond = cond[len("else "):] if cond.startswith("else ") else cond
            ok = True
            if cond.startswith("if "):
                m = re.fullmatch(r'if eq \.Role "([^"]*)"', cond)
                if not m:
                    raise ValueError(f"unsupported condition {cond!r}")
                ok = bool(message) and message["role"] == m.group(1)
            take = active and not taken and ok
            j = run_fn(i + 1, message, out, take)
            taken = taken or take
            if parts[j][1] == "end":
                return j + 1
            i = j

    out: list[str] = []
    run(0, None, out, True)
    return "".join(out)


def modelfile_text(source: str, adapter: str | None, template: str | None, system: str | None, stops: list[str],
                   parameters: dict[str, Any]) -> str:
    lines = [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    for key, value in parameters.items():
        lines.append(f"PARAMETER {key} {value}")
    for s in stops:
        lines.append(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict[str, Any]:
    """Modelfile -> {"FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER": {name: [values]}} (Ollama's syntax:
    one instruction per line, triple-quoted values may span lines, quoted parameter values)."""
    out: dict[str, Any] = {"PARAMETER": {}}
    i = 0
    while i < len(text):
        m = re.compile(r'[ \t]*(\w+)[ \t]+("""(.*?)"""|[^\n]*)\n?', re.S).match(text, i)
        if not m or m.end() == i:
            i = text.index("\n", i) + 1 if "\n" in text[i:] else len(text)
            continue
        word, value = m.group(1).upper(), m.group(3) if m.group(3) is not None else m.group(2).strip()
        if word == "PARAMETER":
            name, _, raw = value.partition(" ")
            raw = raw.strip()
            out["PARAMETER"].setdefault(name, []).append(json.loads(raw) if raw.startswith('"') else raw)
        else:
            out[word] = value
        i = m.end()
    return out


def modelfile_inputs(cfg: Any, output: Path, write_base_gguf: Callable[[Path, Path], Any]
                     ) -> tuple[str, str | None, Any, Any]:
    """(FROM, ADAPTER, prompter, tokenizer) for an export run. For an adapter, FROM is the base's GGUF: the
    given .gguf (or the alias's file), else an f16 GGUF of the base written next to the output by
    `write_base_gguf(base_folder, gguf_path)` (the export verb's own writer, passed in: run.py imports this)."""
    from lorakit.models import adapter_tokenizer_dir, load_tokenizer, resolve_adapter_dir, resolve_model_dir
    from lorakit.models.resolve import ALIASES, _alias_file
    from lorakit.prompts import get_prompter
    from lorakit.prompts.choose import choose_template

    if cfg.format != "gguf-lora":
        model_dir = resolve_model_dir(cfg.model)
        tok = load_tokenizer(model_dir, add_pad_token=False)
        return f"./{output.name}", None, get_prompter(choose_template("auto", tok, []), tok), tok
    base_dir, adapter_dir = resolve_model_dir(cfg.base_model), resolve_adapter_dir(cfg.adapter)
    tok = load_tokenizer(base_dir, adapter_tokenizer_dir([adapter_dir]), add_pad_token=False)
    prompter = get_prompter(choose_template("auto", tok, [adapter_dir]), tok)
    given = Path(cfg.base_model).expanduser()
    if cfg.base_model in ALIASES and _alias_file(cfg.base_model) is not None:
        source = str(_alias_file(cfg.base_model))
    elif given.is_file() and given.suffix == ".gguf":
        source = str(given.resolve())
    else:
        base_gguf = output.parent / f"{base_dir.name}-f16.gguf"
        if not base_gguf.is_file():
            log.info("Modelfile: writing the base model as %s (Ollama's FROM)", base_gguf)
            write_base_gguf(base_dir, base_gguf)
        source = f"./{base_gguf.name}"
    return source, f"./{output.name}", prompter, tok


def write_modelfile_for(cfg: Any, output: Path, write_base_gguf: Callable[[Path, Path], Any]) -> Path:
    """Write `Modelfile` next to `output` for an `export` run (cfg: ExportConfig)."""
    source, adapter, prompter, tokenizer = modelfile_inputs(cfg, output, write_base_gguf)
    template, system = None, None
    try:
        if getattr(prompter, "kind", "") == "chat":
            template, system = chat_go_template(tokenizer)
            probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                     {"role": "user", "content": "2+2?"}]
            messages = ([{"role": "system", "content": system}] if system is not None else []) + probe
            if render_go_template(template, messages) != _render(tokenizer, probe, gen=True).removeprefix(
                    getattr(tokenizer, "bos_token", None) or "\x00"):
                raise ValueError("the Go template renders differently from the chat template")
        else:
            template = alpaca_go_template(prompter.template)
    except ValueError as e:
        log.warning("Modelfile: no TEMPLATE written (%s); Ollama will use the GGUF's chat template", e)
        template, system = None, None
    from lorakit.options import SamplingOptions

    defaults = SamplingOptions()
    params = {"temperature": defaults.temperature, "top_p": defaults.top_p, "top_k": defaults.top_k,
              "repeat_penalty": defaults.repetition_penalty, "num_predict": defaults.max_new_tokens}
    stops = list(prompter.stop_strings)
    head = getattr(prompter, "template", None)
    if head is not None:
        first = head.prompt_no_input.split("{instruction}")[0].rstrip()
        if first:
            stops.append("\n" + first.splitlines()[-1])
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        stops.append(eos)
    # Ollama matches stop text in the output; the newline before an alpaca section head is not needed
    stops = list(dict.fromkeys(s.strip() for s in stops if s.strip()))
    path = output.parent / "Modelfile"
    write_atomic(path, modelfile_text(source, adapter, template, system, stops, params))
    return path
