"""Microbenchmark behind `train.scored_logits_only` (causal LM): SmolLM2-135M + LoRA, forward + backward
under bf16 autocast on 12 real length-grouped ChatterBot chat batches, three ways of computing the same
loss: full logits (the model's own loss), the union over the batch of the scored positions
(`logits_to_keep`, what slimtune does), and exactly each row's scored positions (an lm_head pre-hook).
Interleaved rounds in one process; prints the three losses (equal) and the median speedups.

    flock /tmp/slimtune-bench.lock python benchmarks/micro_scored_logits.py     # about 3 minutes on 2 cores
"""
import statistics
import time

import torch
from slimtune.config import load_config
from slimtune.tasks import get_task
from slimtune.models import load_tokenizer, resolve
from slimtune.data.batching import LengthGroupedBatches
from slimtune.tasks.common import pad_batch
import slimtune.api as api
cfg = load_config({"task": "causal-lm", "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "max_length": 128},
                   "data": {"train": "builtin:chatterbot-chat", "format": "chat"},
                   "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05},
                   "train": {"precision": "bf16"}})
task = get_task("causal-lm")
sp = task.load_data(cfg)
src = resolve(cfg.model.name, cfg.model.gguf_file)
tok = load_tokenizer(src)
f = task.featurize(cfg, tok, sp)["train"]
s = LengthGroupedBatches([len(e["input_ids"]) for e in f], 8, 42)
s.set_epoch(0)
batches = [pad_batch([f[i] for i in b], tok.pad_token_id) for b in s.global_batches()[:12]]
model = api._model_for_task(cfg, task, src, sp, tok)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
F = torch.nn.functional
def full(b):
    return model(**b).loss
def union(b):
    tgt = F.pad(b["labels"][:, 1:], (0, 1), value=-100)
    keep = (tgt != -100).any(0)
    lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=keep).logits
    t = tgt[:, keep]
    return (F.cross_entropy(lg.float().flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum")
            / (t != -100).sum())
head = model.get_output_embeddings()
state = {}
def pre(mod, args):
    m = state.get("mask")
    return (args[0][m].unsqueeze(0),) if m is not None else None
head.register_forward_pre_hook(pre)
def rows(b):
    tgt = F.pad(b["labels"][:, 1:], (0, 1), value=-100)
    m = tgt != -100
    state["mask"] = m
    try:
        lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    finally:
        state["mask"] = None
    return F.cross_entropy(lg[0].float(), tgt[m], reduction="sum") / m.sum()
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    b = batches[0]
    print("losses", float(full(b)), float(union(b)), float(rows(b)))
def run(fn):
    t0 = time.perf_counter()
    for b in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(b)
        loss.backward()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0
for fn in (full, union, rows):
    run(fn)
res = {k: [] for k in ("full", "union", "rows")}
for r in range(3):
    for fn in (full, union, rows):
        res[fn.__name__].append(run(fn))
print({k: [round(x, 2) for x in v] for k, v in res.items()})
m = {k: statistics.median(v) for k, v in res.items()}
print("speedup union", round(m["full"] / m["union"], 3), "rows", round(m["full"] / m["rows"], 3))
