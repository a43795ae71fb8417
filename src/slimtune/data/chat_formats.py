"""The record formats causal-LM users bring, each turned into one conversation: a list of messages
{role, content, ...} in OpenAI's shape, which the model's chat template renders.

  chat         a list of messages per record, in OpenAI's shape ({role, content}; system, user, assistant, tool;
               tool_calls / name / tool_call_id kept; `weight: 0` on an assistant message: context, not trained
               on) or ShareGPT's ({from, value}; human, gpt, system, ...),
               in `data.messages_column` or a `conversations` column; a `tools` column is passed to the template
  sharegpt     the same, with ShareGPT's shape required
  alpaca       instruction / input / output columns (input optional; a `system` column is the system prompt)
  instruction  `data.prompt_column` + `data.response_column` (or a `completion` column: prompt/completion
               pairs), each a string or a list of messages (conversational prompt / completion)
  text         plain text in `data.text_column`

Lists may come as JSON strings (CSV cells). Every record error names the file, the 1-based record, the keys
seen and what is accepted. Torch-free: `slimtune validate` reads records without a model.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import DataError

if TYPE_CHECKING:
    from ..config import RunConfig

FORMATS = ("chat", "sharegpt", "alpaca", "instruction", "text")
ROLES = ("system", "user", "assistant", "tool")
OPENAI_ALIASES = {"developer": "system"}  # OpenAI's newer name of the system role; templates know "system"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "function_call": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_response": "tool"}
MESSAGE_KEYS = ("tool_calls", "name", "tool_call_id", "reasoning_content")  # kept: the template renders them
WEIGHT = "weight"  # OpenAI's per-message training weight (0: context only); kept for the encoder, not the template
ALPACA = ("instruction", "input", "output")
CONVERSATIONS = "conversations"
COMPLETION = "completion"
TOOLS = "tools"
SYSTEM = "system"


def messages_column(cfg: RunConfig, columns: list[str]) -> str:
    """data.messages_column, or ShareGPT's usual `conversations` when the default column is absent."""
    col = cfg.data.messages_column
    return CONVERSATIONS if col not in columns and CONVERSATIONS in columns else col


def response_column(cfg: RunConfig, columns: list[str]) -> str:
    """data.response_column, or `completion` (prompt / completion pairs) when the default column is absent."""
    col = cfg.data.response_column
    return COMPLETION if col not in columns and COMPLETION in columns else col


def detect_format(cfg: RunConfig, columns: list[str], source: str) -> str:
    d = cfg.data
    if d.format != "auto":
        return d.format
    if messages_column(cfg, columns) in columns:
        return "chat"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    if d.prompt_column in columns and response_column(cfg, columns) in columns:
        return "instruction"
    if d.text_column in columns:
        return "text"
    raise DataError(
        f"{source}: cannot tell the record format from the columns {', '.join(columns)}; expected "
        f"{d.messages_column!r} or {CONVERSATIONS!r} (chat: OpenAI messages or ShareGPT turns), 'instruction' + "
        f"'output' (alpaca), {d.prompt_column!r} + {d.response_column!r} or {COMPLETION!r} (instruction / "
        f"prompt-completion) or {d.text_column!r} (plain text); set data.format and the column names"
    )


def required_columns(cfg: RunConfig, fmt: str, columns: list[str]) -> dict[str, str]:
    """{column: the config key or format that names it}."""
    d = cfg.data
    if fmt in ("chat", "sharegpt"):
        return {messages_column(cfg, columns): "data.messages_column"}
    if fmt == "alpaca":
        return {"instruction": "data.format: alpaca", "output": "data.format: alpaca"}
    if fmt == "instruction":
        return {d.prompt_column: "data.prompt_column", response_column(cfg, columns): "data.response_column"}
    return {d.text_column: "data.text_column"}


def text_column(cfg: RunConfig, fmt: str, columns: list[str]) -> str:
    """The column whose texts the data warnings (duplicates, train / eval overlap) look at."""
    return {"chat": messages_column(cfg, columns), "sharegpt": messages_column(cfg, columns), "alpaca": "instruction",
            "instruction": cfg.data.prompt_column}.get(fmt, cfg.data.text_column)


def _where(source: str, i: int, column: str) -> str:
    return f"{source}: record {i + 1}, column {column!r}"


def _as_list(value: Any, source: str, i: int, column: str) -> list:
    if isinstance(value, str) and value.lstrip().startswith("["):  # a CSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{_where(source, i, column)}: not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{_where(source, i, column)}: expected a non-empty list of messages, got "
                        f"{str(value)[:80]!r}")
    return value


def _message(m: Any, shape: str | None, where: str, j: int) -> tuple[dict, str]:
    """One message in OpenAI's shape, and the shape it came in ('openai' / 'sharegpt')."""
    keys = sorted(k for k, v in m.items() if v is not None) if isinstance(m, dict) else []
    if isinstance(m, dict) and m.get("role") is not None and shape != "sharegpt":
        role, got = OPENAI_ALIASES.get(str(m["role"]), str(m["role"])), "openai"
        accepted, content = ROLES, m.get("content")
        if role == "assistant" and content is None and m.get("tool_calls"):
            content = ""  # a tool call with no text
    elif isinstance(m, dict) and m.get("from") is not None and shape != "openai":
        role, got = SHAREGPT_ROLES.get(str(m["from"]), str(m["from"])), "sharegpt"
        accepted, content = tuple(SHAREGPT_ROLES), m.get("value")
    else:
        want = {"openai": "{role, content}", "sharegpt": "{from, value}"}.get(shape or "", "{role, content} "
                                                                                     "(OpenAI) or {from, value} "
                                                                                     "(ShareGPT)")
        raise DataError(f"{where}, message {j + 1}: expected {want}, got keys {keys or type(m).__name__}")
    if role not in ROLES:
        raise DataError(f"{where}, message {j + 1}: unknown role {str(m.get('role', m.get('from')))!r} (keys "
                        f"{keys}); accepted: {', '.join(accepted)}")
    if content is None:
        raise DataError(f"{where}, message {j + 1}: no content (keys {keys}); a message is {{role, content}}")
    out = {"role": role, "content": content if isinstance(content, (str, list)) else str(content)}
    out.update({k: m[k] for k in MESSAGE_KEYS if m.get(k) is not None})
    if role == "assistant" and isinstance(m, dict) and m.get(WEIGHT) is not None:
        if m[WEIGHT] not in (0, 1):
            raise DataError(f"{where}, message {j + 1}: weight {m[WEIGHT]!r}; accepted: 0 (not trained on) or 1")
        out[WEIGHT] = int(m[WEIGHT])
    return out, got


def conversation(value: Any, source: str, i: int, column: str, shape: str | None = None) -> list[dict]:
    """A record's messages in OpenAI's shape; one shape per record (`shape` forces one)."""
    where = _where(source, i, column)
    out: list[dict] = []
    for j, m in enumerate(_as_list(value, source, i, column)):
        msg, got = _message(m, shape, where, j)
        shape = shape or got
        out.append(msg)
    return out


def _require_assistant(messages: list[dict], source: str, i: int, column: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{_where(source, i, column)}: no 'assistant' message, so nothing to learn from")
    return messages


def _system(row: dict, columns: list[str]) -> list[dict]:
    value = row.get(SYSTEM) if SYSTEM in columns else None
    return [{"role": "system", "content": str(value)}] if value not in (None, "") else []


def _turns(value: Any, role: str, source: str, i: int, column: str) -> list[dict]:
    """A prompt or completion cell: a string (one turn of `role`) or a list of messages; a prompt's own
    assistant turns are context (weight 0): the loss is on the completion, as in TRL's prompt-completion."""
    if isinstance(value, list) or (isinstance(value, str) and value.lstrip().startswith("[{")):
        msgs = conversation(value, source, i, column)
        return [{**m, WEIGHT: 0} if role == "user" and m["role"] == "assistant" else m for m in msgs]
    if value is None:
        raise DataError(f"{_where(source, i, column)}: empty; expected a string or a list of messages")
    return [{"role": role, "content": str(value)}]


def record_conversation(cfg: RunConfig, fmt: str, row: dict, columns: list[str], source: str,
                        i: int) -> list[dict]:
    """Record i (0-based) of a chat / sharegpt / alpaca / instruction split as one conversation."""
    if fmt in ("chat", "sharegpt"):
        col = messages_column(cfg, columns)
        msgs = conversation(row[col], source, i, col, "sharegpt" if fmt == "sharegpt" else None)
        return _require_assistant(msgs, source, i, col)
    if fmt == "alpaca":
        instruction, extra, output = (row.get(k) for k in ALPACA)
        if instruction is None or output is None:
            raise DataError(f"{source}: record {i + 1}: alpaca records need 'instruction' and 'output' "
                            f"(got {sorted(k for k, v in row.items() if v is not None)})")
        prompt = str(instruction) + (f"\n\n{extra}" if extra not in (None, "") else "")
        return _system(row, columns) + [{"role": "user", "content": prompt}, {"role": "assistant",
                                                                              "content": str(output)}]
    prompt_col, resp_col = cfg.data.prompt_column, response_column(cfg, columns)
    msgs = _system(row, columns) + _turns(row[prompt_col], "user", source, i, prompt_col) \
        + _turns(row[resp_col], "assistant", source, i, resp_col)
    return _require_assistant(msgs, source, i, resp_col)


def conversations(cfg: RunConfig, fmt: str, ds: Any, source: str) -> list[list[dict]]:
    """Every record of a split (a datasets.Dataset or a list of dicts) as a conversation."""
    columns = list(ds.column_names) if hasattr(ds, "column_names") else sorted({k for r in ds for k in r})
    return [record_conversation(cfg, fmt, row, columns, source, i) for i, row in enumerate(ds)]


def record_tools(ds: Any) -> list | None:
    """The `tools` column (function definitions the template renders), one entry per record, or None."""
    if TOOLS not in getattr(ds, "column_names", []):
        return None
    out = []
    for value in ds[TOOLS]:
        if isinstance(value, str) and value.strip():
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        out.append(value or None)
    return out


def read_conversations(path: str) -> list[list[dict]]:
    """`slimtune predict --messages FILE`: one conversation per JSONL line ({"messages": [...]} or a list of
    messages), each ending with the user turn the model replies to."""
    from .readers import read_lines

    out = []
    for i, line in enumerate(read_lines(path)):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: record {i + 1}: not valid JSON ({e.msg} at char {e.pos})") from None
        if isinstance(value, dict):
            value = value.get("messages", value.get(CONVERSATIONS))
        msgs = conversation(value, path, i, "messages")
        if msgs[-1]["role"] not in ("user", "tool"):
            raise DataError(f"{path}: record {i + 1}: the last message is {msgs[-1]['role']!r}; a conversation to "
                            "reply to ends with a 'user' (or 'tool') message")
        out.append(msgs)
    return out
