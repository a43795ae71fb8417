"""eval.generate: replies generated for eval records and scored against their references, as a callback.

With `every: eval` the scores join each evaluation's metrics (as gen_<name>, before the monitored metric is
read, so eval.monitor may be one); with `every: end` the replies are generated once, with the best checkpoint,
and the scores join the best evaluation's metrics. Every generation's samples go to generations.jsonl (step,
prompt, reference, output, finish reason, per-example scores); the run report shows the latest as a table.
Each process generates its share of the prompts with the unwrapped model (no collective), gathered after.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..tasks.chat_encoding import end_of_turn_ids
from ..tasks.generation import check_metric_libraries, generate_batch, scored_rows
from . import checkpoint
from .callbacks import Callback

if TYPE_CHECKING:
    from ..config.sections import GenerateConfig
    from ..track.rundir import RunDir
    from .loop import Loop

FILE = "generations.jsonl"


class GenerationEval(Callback):
    def __init__(self, gen: GenerateConfig, prompts: list[dict], tokenizer, files: RunDir, main: bool):
        check_metric_libraries(list(gen.metrics))
        # a reply ends at any of the template's end-of-turn tokens, not only EOS
        self.gen, self.prompts, self.tokenizer, self.end_ids = gen, prompts, tokenizer, end_of_turn_ids(tokenizer)
        self.files, self.main = files, main
        self.lines: list[str] = []

    def on_train_begin(self, loop: Loop) -> None:
        if checkpoint.sharded(loop.accelerator.unwrap_model(loop.model)):
            raise ConfigError("eval.generate: generation under a sharded model (FSDP / ZeRO-3) is not supported; "
                              "remove eval.generate or train without sharding")
        path = self.files.path / FILE
        if self.main and path.is_file():  # a resumed run: the samples up to the step it resumes from
            step = loop.state.step
            self.lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                          if ln.strip() and json.loads(ln).get("step", 0) <= step]

    def eval_metrics(self, loop: Loop) -> dict:
        return self._generate(loop, loop.state.step) if self.gen.every == "eval" else {}

    def on_best_loaded(self, loop: Loop) -> None:
        if self.gen.every != "end" or loop.stop_status == "pruned":
            return
        step = loop.state.best_step if loop.state.best_step is not None else loop.state.step
        scores = self._generate(loop, step)
        loop.run.log({"type": "generate", "step": step, **{f"eval_{k}": v for k, v in scores.items()}})
        loop.state.assign(loop.state.replace(best_metrics={**(loop.state.best_metrics or {}), **scores}))

    def _generate(self, loop: Loop, step: int) -> dict:
        from accelerate.utils import gather_object

        acc = loop.accelerator
        mine = list(range(acc.process_index, len(self.prompts), acc.num_processes))
        with acc.autocast():
            outs = generate_batch(acc.unwrap_model(loop.model), self.tokenizer,
                                  [self.prompts[i]["prompt_ids"] for i in mine], self.gen.max_new_tokens,
                                  self.end_ids, self.gen.batch_size, self.gen.do_sample)
        rows = [(i, ids, stopped) for i, (ids, stopped) in zip(mine, outs)]
        if acc.num_processes > 1:
            rows = gather_object(rows)
        rows.sort(key=lambda r: r[0])
        total, scored = scored_rows(self.tokenizer, self.prompts, rows, list(self.gen.metrics))
        if self.main:
            self.lines += [json.dumps({"step": step, **row}) for row in scored]
            self.files.write_text(FILE, "\n".join(self.lines) + "\n")
        return {f"gen_{k}": v for k, v in total.items()}
