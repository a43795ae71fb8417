"""Parameter groups from the model's structure: embeddings, each block, head.

The splitter knows the layout of every architecture we support through one rule:
the transformer blocks are the largest ModuleList of identical layers (BERT
`encoder.layer`, Llama `model.layers`, GPT-2 `h`, ViT `encoder.layer`); parameters
before them with 'embed' / 'wte' / 'wpe' in the name are the embeddings; the task
head and anything else outside the blocks (pooler, final norm) form the top group.
An unknown layout falls back to a single group and says so.

Groups are ordered bottom (embeddings) to top (head); fastai's discriminative
rates (`slice(lo, hi)`) and BEiT / ELECTRA layer-wise decay are functions of the
group's position.
"""
from __future__ import annotations

from dataclasses import dataclass, field

EMBED_WORDS = ("embed", "wte", "wpe", "patch_embed", "cls_token", "pos_embed", "position_embeddings")


@dataclass
class Groups:
    names: list[str]  # bottom -> top, e.g. ["embeddings", "block.0", ..., "block.5", "head"]
    of_param: dict[str, str] = field(default_factory=dict)  # parameter name -> group name
    note: str | None = None

    def index(self, group: str) -> int:
        return self.names.index(group)


def split_groups(model) -> Groups:
    from ..methods.targets import find_blocks

    params = [n for n, _ in model.named_parameters()]
    try:
        blocks_name, blocks = find_blocks(model)
    except ValueError:
        return Groups(["all"], {n: "all" for n in params},
                      note=f"{type(model).__name__}: no repeated blocks found; all parameters form one group")
    prefix = blocks_name + "."
    n_blocks = len(blocks)
    of = {}
    for n in params:
        if "prompt_encoder" in n:  # soft prompts are trained like a head, at the full rate
            of[n] = "head"
        elif n.startswith(prefix):
            of[n] = f"block.{int(n[len(prefix):].split('.')[0])}"
        elif any(w in n for w in EMBED_WORDS):
            of[n] = "embeddings"
        else:  # the head, and what sits between the blocks and it (pooler, final norm)
            of[n] = "head"
    names = (["embeddings"] if "embeddings" in of.values() else []) + [f"block.{i}" for i in range(n_blocks)] + ["head"]
    return Groups(names, of)


def lr_multipliers(groups: Groups, layer_decay: float | None, lr_ratio_min: float | None,
                   head_mult: float | None) -> dict[str, float]:
    """Multiplier of train.lr for each group.

    layer_decay d: the head gets 1, the top block d, each group below d times the one above
    (BEiT / ELECTRA; timm's param_groups_layer_decay).
    lr_ratio_min r: a geometric spread from r (embeddings) to 1 (head) over the groups (fastai slice).
    head_mult: the head's own multiplier (default 1).
    """
    names = groups.names
    top = len(names) - 1  # the head's position; group k is (top - k) steps below it
    mult = {}
    for k, g in enumerate(names):
        m = 1.0
        if layer_decay is not None:
            m *= layer_decay ** (top - k)
        if lr_ratio_min is not None and top > 0:
            m *= lr_ratio_min ** ((top - k) / top)
        mult[g] = m
    if head_mult is not None and "head" in mult:
        mult["head"] = head_mult
    return mult
