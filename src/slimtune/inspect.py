"""`slimtune inspect MODEL`: what can be adapted, and what each method would cost.

The model is built on the meta device (shapes only, no weights, no memory), each
method is applied to a copy at its default options, and one training step (forward
and backward) with a batch of the given size runs on meta tensors while a dispatch
mode keeps the books an allocator would: every storage an op creates counts from that
op until the last tensor on it is freed. The peak of those books is what the step
holds on top of the weights: saved activations, temporaries and the gradients as they
appear. So the estimate follows the model's own code and needs no download of the
weights beyond the config.

training memory ~= weights and buffers (fp32) + AdamW state (2 x trainable, fp32)
                  + the peak of one forward + backward pass (fp32)
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import warnings
import weakref
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .methods import REGISTRY, MethodContext, apply_method
from .methods.targets import block_linear_names, find_blocks
from .models import ModelSource, resolve
from .tasks import TASKS, task_spec
from .tasks.spec import TaskSpec


def detect_task(config) -> str:
    """The task a model's config suggests: a config with image channels and no vocabulary classifies images;
    a decoder (a causal-LM architecture) trains its own output layer, any other model gets a new head, on token
    inputs."""
    if hasattr(config, "num_channels") and not hasattr(config, "vocab_size"):
        return next(spec.name for spec in TASKS.values() if spec.inputs == "images" and spec.auto_model)
    archs = getattr(config, "architectures", None) or []
    decoder = any(a.endswith("ForCausalLM") for a in archs) or getattr(config, "is_decoder", False)
    return next(spec.name for spec in TASKS.values() if spec.inputs == "tokens" and spec.has_head != decoder)


def _inspectable(task: str) -> TaskSpec:
    from .config import ConfigError

    spec = TASKS.get(task)
    if spec is None or spec.auto_model is None:
        names = [s.name for s in TASKS.values() if s.auto_model]
        raise ConfigError(f"inspect: task {task!r} cannot be inspected; use one of {', '.join(names)} or auto")
    return spec


def _meta_model(source: ModelSource, task: str, num_labels: int,
                trust_remote_code: bool) -> tuple[torch.nn.Module, str]:
    """The model built on the meta device (its config only, no weights), and the task it is built for."""
    import transformers

    kw = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kw["gguf_file"] = source.gguf_file
    config = transformers.AutoConfig.from_pretrained(source.path, **kw)
    spec = _inspectable(detect_task(config) if task == "auto" else task)
    if spec.has_head:
        config.num_labels = num_labels
        if spec.inputs == "tokens" and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
    with torch.device("meta"):
        model = getattr(transformers, spec.auto_model).from_config(config, trust_remote_code=trust_remote_code)
    if spec.inputs == "images":  # as training builds it: a ViT at another size, BatchNorm frozen
        from .tasks.image_classification import adapt_loaded

        adapt_loaded(model)
    return model, spec.name


def head_modules(model: torch.nn.Module, task: str) -> list[str]:
    return [n for n in ("classifier", "score") if hasattr(model, n)] if task_spec(task).has_head else []


def default_method_config(name: str, for_counting: bool = True):
    cfg = REGISTRY[name].config()
    if for_counting and hasattr(cfg, "init") and cfg.init in ("pissa", "olora", "eva"):
        # same parameter count as plain LoRA; their initialisations need real weights or data
        cfg = cfg.model_copy(update={"init": "default"})
    return cfg


class _AllocatorBooks(TorchDispatchMode):
    """The bytes an allocator would hold while ops run: a storage counts from the op that creates it
    until the last tensor on it is freed (views share their base's storage). Storages that existed
    before (the model's parameters and buffers, the batch) are not counted."""

    def __init__(self, existing: set):
        super().__init__()
        self.existing = existing
        self.storages: dict[int, list] = {}  # storage key -> [tensors alive on it, bytes]
        self.live = self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        key = s._cdata
        if key in self.existing:
            return
        entry = self.storages.get(key)
        if entry is None:
            entry = self.storages[key] = [0, s.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.storages.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class _CpuAttention(TorchFunctionMode):
    """On the meta device torch's scaled_dot_product_attention takes its math path, which keeps the attention
    probabilities (batch x heads x length^2) for the backward pass; a CPU takes its flash kernel wherever there
    is no attention dropout, which keeps the output and its log-sum-exp only. The books follow the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].device.type == "meta":
            call = _SDPA.bind(*args, **kwargs).arguments
            if not call.get("dropout_p"):
                mask = call.get("attn_mask")
                if mask is not None and mask.dtype == torch.bool:  # as the CPU does: an additive float mask
                    mask = torch.zeros(mask.shape, dtype=args[0].dtype, device=mask.device).masked_fill(~mask, -1e9)
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    call["query"], call["key"], call["value"], 0.0, call.get("is_causal", False), attn_mask=mask,
                    scale=call.get("scale"))[0]
        return func(*args, **kwargs)


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention's parameters (a builtin: inspect cannot read them)."""


_SDPA = inspect.signature(_sdpa_signature)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def weights_bytes(model) -> int:
    """Parameters and buffers, each storage once (tied weights share one)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def step_bytes(model, batch: dict) -> dict:
    """One forward + backward: the peak bytes held on top of the weights (`peak`), of which autograd
    saved `saved` for the backward pass (counted once per storage), and the gradients left (`grads`)."""
    inputs = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    existing = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers()) + inputs}
    saved: dict[int, int] = {}

    def pack(t):
        key = _storage_key(t)
        if key not in existing:
            saved[key] = t.untyped_storage().nbytes()
        return t

    books = _AllocatorBooks(existing)
    with _CpuAttention(), books, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
        loss = out.loss if getattr(out, "loss", None) is not None else out.logits.float().mean()
        del out
        saved_bytes = sum(saved.values())
        loss.backward()
        del loss
    grads = books.live  # what is left after backward: the gradients
    for p in model.parameters():
        p.grad = None
    return {"peak": books.peak, "saved": saved_bytes, "grads": grads}


def dummy_batch(task: str, batch_size: int, seq_len: int, device: str = "meta", vocab: int = 100) -> dict:
    """A training batch of the task's inputs: `seq_len` tokens per example, or for an image task RGB images of
    `seq_len` x `seq_len` pixels (what the task's collate gives the model: 3 channels, any image mode)."""
    if task_spec(task).inputs == "images":
        pixels = torch.zeros(batch_size, 3, seq_len, seq_len, device=device)
        return {"pixel_values": pixels, "labels": torch.zeros(batch_size, dtype=torch.long, device=device)}
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    if device != "meta":
        ids = torch.randint(5, vocab, (batch_size, seq_len), device=device)
    batch = {"input_ids": ids}  # no mask: all tokens real, and a mask would be inspected with .all() (data-dependent)
    # a head predicts one class per example; a language model each next token
    if task_spec(task).has_head:
        shape = (batch_size, seq_len) if task_spec(task).labels_per_token else (batch_size,)
        batch["labels"] = torch.zeros(shape, dtype=torch.long, device=device)
    else:
        batch["labels"] = ids.clone()
    return batch


def method_cost(model: torch.nn.Module, task: str, name: str, batch_size: int, seq_len: int, cfg=None,
                activations: bool = True) -> dict:
    from .methods import MethodError

    m = copy.deepcopy(model)
    cfg = cfg or default_method_config(name)
    ctx = MethodContext(task, task_spec(task).peft_task_type, head_modules(m, task), 100, None)
    method = REGISTRY[name]
    try:
        if method.check_environment:
            method.check_environment(cfg)
        m = apply_method(m, cfg, ctx)
    except (MethodError, ValueError, TypeError, NotImplementedError) as e:
        return {"method": name, "error": str(e).splitlines()[0]}
    # AdaLoRA's `ranknum` is a frozen Parameter that comes out trainable when built on meta
    trainable = sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and "ranknum" not in n)
    base_total = sum(p.numel() for p in model.parameters())
    row = {"method": name, "trainable_params": trainable, "share": trainable / base_total,
           "weights_bytes": weights_bytes(m), "grad_bytes": trainable * 4,
           # slimtune's fused AdamW: exp_avg and exp_avg_sq per trainable value and a 4-byte step count per
           # tensor; it updates in place, so the optimizer step adds nothing to the forward + backward peak
           "optimizer_bytes": trainable * 8 + 4 * sum(1 for p in m.parameters() if p.requires_grad),
           "adapter_bytes": trainable * 4, "mergeable": method.mergeable}
    step = None
    if activations:
        try:
            m.train()
            step = step_bytes(m, dummy_batch(task, batch_size, seq_len))
            row["activation_bytes"], row["step_peak_bytes"] = step["saved"], step["peak"]
        except Exception as e:  # a model whose forward cannot run on meta tensors
            row["activation_bytes"] = row["step_peak_bytes"] = None
            first = (str(e).splitlines() or [""])[0][:120]
            row["note"] = (f"train memory without activations: the forward pass failed on the meta device "
                           f"({type(e).__name__}: {first})")
    # the step's peak includes the gradients as they appear; without it, count them whole
    held = step["peak"] if step else row["grad_bytes"]
    row["train_memory_bytes"] = row["weights_bytes"] + row["optimizer_bytes"] + held
    if step:
        row.update(_checkpointed_cost(m, method, task, batch_size, seq_len, row))
    return row


def _checkpointed_cost(model: torch.nn.Module, method, task: str, batch_size: int, seq_len: int, row: dict) -> dict:
    """The same step with train.gradient_checkpointing: true, run the same way: the books see what the
    checkpointed blocks keep (their inputs) and the recomputation in the backward pass."""
    from .errors import SlimtuneError
    from .train.activation_checkpointing import enable_checkpointing

    if method.checkpointing_conflict:
        return {"checkpointed_note": method.checkpointing_conflict}
    try:
        enable_checkpointing(model, True, context_fn=lambda: (contextlib.nullcontext(), _CpuAttention()))
    except SlimtuneError as e:
        return {"checkpointed_note": str(e)}
    batch = dummy_batch(task, batch_size, seq_len)
    if not task_spec(task).has_head:
        # training with checkpointing runs without a cache, and then a decoder checks the position ids for packed
        # sequences, which needs data (meta tensors have none); an empty cache skips that check, and the
        # checkpointed blocks drop it, so it holds nothing
        from transformers import DynamicCache

        batch["past_key_values"] = DynamicCache()
    try:
        step = step_bytes(model, batch)
    except Exception as e:  # a model whose checkpointed forward cannot run on meta tensors
        return {"checkpointed_note": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"}
    return {"checkpointed_activation_bytes": step["saved"], "checkpointed_step_peak_bytes": step["peak"],
            "checkpointed_train_memory_bytes": row["weights_bytes"] + row["optimizer_bytes"] + step["peak"]}


@contextlib.contextmanager
def _quiet_dependencies():
    """Building every method on a copy makes peft and transformers warn about things that concern
    training, not an estimate (BOFT's missing CUDA extension, deprecations): hide their warnings and
    log messages while inspect computes, keep slimtune's own, and restore the settings afterwards."""
    from transformers.utils import logging as hf_logging

    hf_level, peft_logger = hf_logging.get_verbosity(), logging.getLogger("peft")
    peft_level = peft_logger.level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_logging.set_verbosity_error()
        peft_logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            hf_logging.set_verbosity(hf_level)
            peft_logger.setLevel(peft_level)
    for w in caught:
        if "/slimtune/" in w.filename.replace("\\", "/"):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def inspect_model(name: str, task: str = "auto", batch_size: int = 8, seq_len: int = 128, num_labels: int = 2,
                  methods: list[str] | None = None, trust_remote_code: bool = False,
                  image_size: int | None = None) -> dict:
    """The report; an image model's batch holds `image_size` x `image_size` images (default: its own size)."""
    with _quiet_dependencies():
        return _inspect(name, task, batch_size, seq_len, num_labels, methods, trust_remote_code, image_size)


def _inspect(name: str, task: str, batch_size: int, seq_len: int, num_labels: int, methods: list[str] | None,
             trust_remote_code: bool, image_size: int | None) -> dict:
    source = resolve(name)
    model, task = _meta_model(source, task, num_labels, trust_remote_code)
    images = task_spec(task).inputs == "images"
    if images:  # the image side takes the sequence length's place in the batch
        from .tasks.image_classification import default_image_size

        seq_len = image_size or default_image_size(source, model.config)
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
        "target_modules": [{"name": n, "peft_name": n.split(".")[-1], "example": f"{blocks_name}.0.{n}",
                            "weight_shape": shapes.get(n)} for n in targets],
        "batch_size": batch_size, **({"image_size": seq_len} if images else {"seq_len": seq_len}),
        "methods": rows,
        "estimate": "training memory = fp32 weights and buffers + AdamW state (2x trainable) + the peak of one "
                    "forward + backward pass (saved activations, temporaries, gradients; fp32, run on the meta device)",
    }


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def print_report(r: dict, console) -> None:
    from rich.table import Table

    console.print(f"[bold]{r['model']}[/] ({r['source']}): {r['architecture']}, task {r['task']}")
    console.print(f"blocks: {r['blocks']['count']} x {r['blocks']['type']} at {r['blocks']['path']}; "
                  f"hidden size {r['hidden_size']}; {r['total_params']:,} parameters; "
                  f"head: {', '.join(r['head']) or '(the LM head, frozen by default)'}")
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
    # fits 80 columns: method names never wrap, headers are short, the numbers are narrow
    per_example = f"{r['image_size']} px images" if "image_size" in r else f"{r['seq_len']} tokens"
    t = Table(title=f"methods at default options (MB for batch {r['batch_size']} x {per_example})",
              show_edge=False)
    t.add_column("method", no_wrap=True)
    for c in ("trainable", "share", "train", "ckpt", "saved", "adapter", "merge"):
        t.add_column(c, justify="right", no_wrap=True)
    for row in r["methods"]:
        if "error" in row:
            t.add_row(row["method"], "-", "-", "-", "-", "-", "-", "n/a")
            continue
        t.add_row(row["method"], f"{row['trainable_params']:,}", f"{row['share']:.2%}", _mb(row["train_memory_bytes"]),
                  _mb(row.get("checkpointed_train_memory_bytes")), _mb(row.get("activation_bytes")),
                  _mb(row["adapter_bytes"]), "yes" if row["mergeable"] else "no")
    console.print(t)
    for row in r["methods"]:
        if "error" in row or "note" in row:
            console.print(f"[yellow]{row['method']}[/]: {row.get('error') or row['note']}")
        elif "checkpointed_note" in row:
            console.print(f"[yellow]{row['method']}[/] (ckpt): {row['checkpointed_note']}")
    console.print(f"[dim]train: {r['estimate']}; ckpt: the same with train.gradient_checkpointing: true; saved: "
                  "the activations autograd keeps for backward; eva is counted at LoRA's rank budget before its "
                  "data-driven redistribution[/]")
