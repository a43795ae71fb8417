"""An Ollama Modelfile beside the exported GGUF: `ollama create NAME -f Modelfile` makes it a local model.

Ollama renders prompts with Go templates, not the Jinja chat template transformers uses, so the chat
template is translated for the families recognised by their turn markers (ChatML, Llama 3, Gemma), each
with the stop tokens that end a turn; any other template gets a note instead of a guess.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Go templates over Ollama's .Messages (system / user / assistant turns); a turn that is not the assistant's
# as the last one is followed by the assistant's header, as add_generation_prompt does.
_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
CHATML = ("{{- range $i, $m := .Messages }}\n" + _LAST
          + "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n"
          "{{ if and $last (ne $m.Role \"assistant\") }}<|im_start|>assistant\n{{ end }}\n"
          "{{- end }}")
LLAMA3 = ("{{- range $i, $m := .Messages }}\n" + _LAST
          + "<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n{{ $m.Content }}<|eot_id|>\n"
          "{{- if and $last (ne $m.Role \"assistant\") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n"
          "{{- end }}")
GEMMA = ("{{- range $i, $m := .Messages }}\n" + _LAST
         + "<start_of_turn>{{ if eq $m.Role \"assistant\" }}model{{ else }}{{ $m.Role }}{{ end }}\n"
         "{{ $m.Content }}<end_of_turn>\n"
         "{{ if and $last (ne $m.Role \"assistant\") }}<start_of_turn>model\n{{ end }}\n"
         "{{- end }}")


@dataclass(frozen=True)
class ChatFamily:
    name: str
    marker: str  # a token only this family's Jinja template writes
    template: str
    stops: tuple[str, ...]  # the tokens that end a turn


FAMILIES = (ChatFamily("ChatML", "<|im_start|>", CHATML, ("<|im_end|>",)),
            ChatFamily("Llama 3", "<|start_header_id|>", LLAMA3, ("<|eot_id|>",)),
            ChatFamily("Gemma", "<start_of_turn>", GEMMA, ("<end_of_turn>",)))


def chat_family(chat_template: str | None) -> ChatFamily | None:
    for family in FAMILIES:
        if chat_template and family.marker in chat_template:
            return family
    return None


def model_name(text: str) -> str:
    """An Ollama model name from a run name: lower case, digits, '.', '_', '-'."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "slimtune-model"


def modelfile(chat_template: str | None, eos_token: str | None, source: str,
              gguf_name: str = "model.gguf") -> tuple[str, str | None]:
    """(the Modelfile's text, a warning or None)."""
    lines = [f"# Ollama Modelfile for {source}, written by `slimtune export`", f"FROM ./{gguf_name}"]
    family = chat_family(chat_template)
    stops = list(family.stops) if family else []
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    warning = None
    if family is None:
        warning = ("the chat template is not ChatML, Llama 3 or Gemma style, so the Modelfile has no TEMPLATE; "
                   "Ollama falls back to the GGUF's tokenizer.chat_template where it recognises it, else write "
                   "a TEMPLATE for the model's turn format")
        lines.append(f"# No TEMPLATE: {warning}")
    else:
        lines += [f"# TEMPLATE: the model's {family.name} chat template, as a Go template",
                  f'TEMPLATE """{family.template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n", warning
