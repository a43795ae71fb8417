"""`slimtune inspect MODEL`: what can be adapted, and what each method would cost.

The model is built on the meta device (shapes only, no weights, no memory), each
method is applied to a copy at its default options, and one forward pass with a
batch of the given size runs on meta tensors while a saved-tensor hook adds up what
autograd keeps for the backward pass. So the estimate is exact about the model's
own structure and needs no download of the weights beyond the config.

training memory ~= weights (fp32) + gradients (trainable, fp32)
                  + AdamW state (2 x trainable, fp32) + saved activations (fp32)
"""
from __future__ import annotations

import copy
from collections import Counter

import torch

from .methods import REGISTRY, MethodContext, apply_method
from .methods.targets import block_linear_names, find_blocks
from .models import resolve


def _meta_model(source, task: str, num_labels: int, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    kw = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kw["gguf_file"] = source.gguf_file
    config = AutoConfig.from_pretrained(source.path, **kw)
    if task == "auto":
        archs = getattr(config, "architectures", None) or []
        task = "causal-lm" if any(a.endswith("ForCausalLM") for a in archs) or getattr(config, "is_decoder", False) else "text-classification"
    if task == "text-classification":
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return model, task


def head_modules(model, task: str) -> list[str]:
    return [n for n in ("classifier", "score") if hasattr(model, n)] if task == "text-classification" else []


def default_method_config(name: str, for_counting: bool = True):
    cfg = REGISTRY[name].config()
    if for_counting and hasattr(cfg, "init") and cfg.init in ("pissa", "olora", "eva"):
        # same parameter count as plain LoRA; their initialisations need real weights or data
        cfg = cfg.model_copy(update={"init": "default"})
    return cfg


def saved_activation_bytes(model, batch: dict) -> int:
    """Bytes autograd saves for backward in one forward pass (tensors counted once)."""
    seen: dict[int, int] = {}
    keep = []

    def pack(t):
        if isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad):
            return t  # weights are counted as weights, not activations
        key = id(t) if t.device.type == "meta" else t.untyped_storage().data_ptr()
        if key not in seen:
            seen[key] = t.numel() * t.element_size() if t.device.type == "meta" else t.untyped_storage().nbytes()
            keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
        loss = out.loss if getattr(out, "loss", None) is not None else out.logits.float().mean()
    del loss, out
    return sum(seen.values())


def dummy_batch(task: str, batch_size: int, seq_len: int, device="meta", vocab: int = 100) -> dict:
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    if device != "meta":
        ids = torch.randint(5, vocab, (batch_size, seq_len), device=device)
    batch = {"input_ids": ids}  # no mask: all tokens real, and a mask would be inspected with .all() (data-dependent)
    batch["labels"] = ids.clone() if task == "causal-lm" else torch.zeros(batch_size, dtype=torch.long, device=device)
    return batch


def method_cost(model, task: str, name: str, batch_size: int, seq_len: int, cfg=None, activations: bool = True) -> dict:
    from .methods import MethodError

    m = copy.deepcopy(model)
    cfg = cfg or default_method_config(name)
    ctx = MethodContext(task, "SEQ_CLS" if task == "text-classification" else "CAUSAL_LM", head_modules(m, task), 100, None)
    method = REGISTRY[name]
    try:
        if method.check_environment:
            method.check_environment(cfg)
        m = apply_method(m, cfg, ctx)
    except (MethodError, ValueError, TypeError, NotImplementedError) as e:
        return {"method": name, "error": str(e).splitlines()[0]}
    # AdaLoRA's `ranknum` is a frozen Parameter that comes out trainable when built on meta
    trainable = sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and "ranknum" not in n)
    total = sum(p.numel() for p in m.parameters())
    base_total = sum(p.numel() for p in model.parameters())
    row = {"method": name, "trainable_params": trainable, "share": trainable / base_total,
           "weights_bytes": total * 4, "grad_bytes": trainable * 4, "optimizer_bytes": trainable * 8,
           "adapter_bytes": trainable * 4, "mergeable": method.mergeable}
    if activations:
        try:
            m.train()
            row["activation_bytes"] = saved_activation_bytes(m, dummy_batch(task, batch_size, seq_len))
        except Exception as e:  # a model whose forward cannot run on meta tensors
            row["activation_bytes"] = None
            row["note"] = f"activations not estimated: {type(e).__name__}"
    act = row.get("activation_bytes") or 0
    row["train_memory_bytes"] = row["weights_bytes"] + row["grad_bytes"] + row["optimizer_bytes"] + act
    return row


def inspect_model(name: str, task: str = "auto", batch_size: int = 8, seq_len: int = 128, num_labels: int = 2,
                  methods: list[str] | None = None, trust_remote_code: bool = False) -> dict:
    source = resolve(name)
    model, task = _meta_model(source, task, num_labels, trust_remote_code)
    blocks_name, blocks = find_blocks(model)
    kinds = Counter()
    for _, mod in model.named_modules():
        own = sum(p.numel() for p in mod.parameters(recurse=False))
        if own:
            kinds[type(mod).__name__] += own
    heads = head_modules(model, task)
    targets = block_linear_names(model, heads)
    first = blocks[0]
    shapes = {n: list(dict(first.named_modules())[n].weight.shape) for n in targets if n in dict(first.named_modules())}
    rows = [method_cost(model, task, m, batch_size, seq_len) for m in (methods or list(REGISTRY))]
    return {
        "model": name, "source": source.origin, "task": task, "architecture": type(model).__name__,
        "blocks": {"path": blocks_name, "count": len(blocks), "type": type(first).__name__},
        "hidden_size": getattr(model.config, "hidden_size", None),
        "total_params": sum(p.numel() for p in model.parameters()),
        "params_by_module_kind": dict(kinds.most_common()),
        "head": heads,
        "target_modules": [{"name": n, "peft_name": n.split(".")[-1], "example": f"{blocks_name}.0.{n}", "weight_shape": shapes.get(n)} for n in targets],
        "batch_size": batch_size, "seq_len": seq_len,
        "methods": rows,
        "estimate": "training memory = fp32 weights + fp32 gradients of trainable params + AdamW state (2x trainable) "
                    "+ activations saved for backward (fp32, meta-device forward pass)",
    }


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def print_report(r: dict, console) -> None:
    from rich.table import Table

    console.print(f"[bold]{r['model']}[/] ({r['source']}): {r['architecture']}, task {r['task']}")
    console.print(f"blocks: {r['blocks']['count']} x {r['blocks']['type']} at {r['blocks']['path']}; hidden size {r['hidden_size']}; "
                  f"{r['total_params']:,} parameters; head: {', '.join(r['head']) or '(the LM head, frozen by default)'}")
    t = Table(title="parameters by module kind")
    t.add_column("kind"), t.add_column("params", justify="right")
    for k, v in r["params_by_module_kind"].items():
        t.add_row(k, f"{v:,}")
    console.print(t)
    t = Table(title="candidate target modules (method.targets takes the peft names)")
    t.add_column("in each block"), t.add_column("peft name"), t.add_column("weight shape")
    for m in r["target_modules"]:
        t.add_row(m["name"], m["peft_name"], "x".join(map(str, m["weight_shape"] or [])))
    console.print(t)
    t = Table(title=f"methods at default options (memory for batch {r['batch_size']} x {r['seq_len']} tokens)")
    for c in ("method", "trainable", "share", "train memory MB", "activations MB", "adapter MB", "merge"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for row in r["methods"]:
        if "error" in row:
            t.add_row(row["method"], "-", "-", "-", "-", "-", "n/a")
            continue
        t.add_row(row["method"], f"{row['trainable_params']:,}", f"{row['share']:.3%}", _mb(row["train_memory_bytes"]),
                  _mb(row.get("activation_bytes")), _mb(row["adapter_bytes"]), "yes" if row["mergeable"] else "no")
    console.print(t)
    for row in r["methods"]:
        if "error" in row:
            console.print(f"[yellow]{row['method']}[/]: {row['error']}")
    console.print(f"[dim]{r['estimate']}; eva is counted at LoRA's rank budget before its data-driven redistribution[/]")
