"""The run config: dotted overrides, unknown keys, bad values, the examples, and the CLI's
config-facing commands (schema, validate, run). Fast: no model is loaded, no network."""
from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.config import ConfigError, RunConfig, apply_overrides, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SECTIONS = ("task", "model", "data", "method", "train", "eval", "output")


def base(task: str = "text-classification", **sections) -> dict:
    """The smallest valid config: task, model and data.train (nothing is read or loaded)."""
    return {"task": task, "model": {"name": "some-org/some-model"}, "data": {"train": "train.csv"}, **sections}


def config_error(data, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(data, overrides)
    return str(info.value)


def flat(text: str) -> str:
    """Output with line wrapping undone (rich wraps long lines)."""
    return " ".join(text.split())


def accepted_part(msg: str) -> str:
    assert "accepted" in msg, msg
    return msg.split("accepted", 1)[1]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "1000"})


# -- dotted overrides ----------------------------------------------------------

@pytest.mark.parametrize("item, path, value", [
    ("method.r=16", ["method", "r"], 16),
    ("train.lr=0.0003", ["train", "lr"], 3e-4),
    ("train.max_grad_norm=null", ["train", "max_grad_norm"], None),
    ("train.max_grad_norm=", ["train", "max_grad_norm"], None),
    ("eval.metrics=[accuracy]", ["eval", "metrics"], ["accuracy"]),
    ("eval.metrics=[accuracy, macro_f1]", ["eval", "metrics"], ["accuracy", "macro_f1"]),
    ("train.group_by_length=false", ["train", "group_by_length"], False),
    ("output.name=a=b", ["output", "name"], "a=b"),  # only the first '=' separates key and value
    (" task = causal-lm", ["task"], "causal-lm"),
])
def test_parse_override_yaml_values(item, path, value):
    got_path, got = parse_override(item)
    assert got_path == path
    assert got == value
    assert type(got) is type(value)


def test_overrides_reach_the_typed_config():
    cfg = load_config(base(), ["train.lr=3e-4", "method.r=16", "train.max_grad_norm=null", "eval.metrics=[accuracy]"])
    # YAML 1.1 reads '3e-4' as a string; the typed config must still hold the float
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(3e-4)
    assert isinstance(cfg.method.r, int) and cfg.method.r == 16
    assert cfg.train.max_grad_norm is None
    assert cfg.eval.metrics == ["accuracy"]
    # untouched keys keep their defaults
    assert cfg.train.batch_size == 16 and cfg.method.alpha == 16.0


def test_override_creates_missing_nested_sections_without_mutating_input():
    data = base()
    before = copy.deepcopy(data)
    out = apply_overrides(data, ["train.early_stopping.patience=3", "output.name=my-run"])
    assert data == before
    assert out["train"] == {"early_stopping": {"patience": 3}}
    assert out["output"] == {"name": "my-run"}
    cfg = load_config(data, ["train.early_stopping.patience=3", "output.name=my-run"])
    assert cfg.train.early_stopping.patience == 3
    assert cfg.output.name == "my-run"
    assert cfg.train.epochs == 3.0  # the rest of the new section is defaults


def test_override_fills_a_section_left_empty_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: text-classification\nmodel:\n  name: m\ndata:\n  train: t.csv\ntrain:\n", encoding="utf-8")
    assert load_config(path, ["train.batch_size=4"]).train.batch_size == 4


def test_override_replaces_yaml_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base(train={"lr": 0.1, "epochs": 2})), encoding="utf-8")
    cfg = load_config(path, ["train.lr=0.5"])
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 2


def test_override_through_a_scalar_is_an_error():
    msg = config_error(base(), ["model.name.x=1"])
    assert "model.name.x=1" in msg and "'name'" in msg and "not a section" in msg


@pytest.mark.parametrize("item", ["train.lr", "train..lr=1", "=3", ".lr=1", "train.=1", "  =1"])
def test_malformed_override_names_it(item):
    with pytest.raises(ConfigError) as info:
        parse_override(item)
    assert repr(item) in str(info.value)
    # and the same through load_config
    assert repr(item) in config_error(base(), [item])


# -- unknown keys --------------------------------------------------------------

@pytest.mark.parametrize("override, key_path, must_accept", [
    ("foo=1", "foo", ["task", "model", "data", "method", "train", "eval", "output"]),
    ("train.lrr=0.1", "train.lrr", ["lr", "epochs", "schedule"]),
    ("method.rank=4", "method.rank", ["r", "alpha", "dropout"]),
    ("data.text_col=x", "data.text_col", ["text_column", "label_column"]),
    ("train.early_stopping.patiense=2", "train.early_stopping.patiense", ["patience", "min_delta"]),
])
def test_unknown_key_names_path_and_accepted_keys(override, key_path, must_accept):
    msg = config_error(base(), [override])
    assert f"{key_path}:" in msg
    assert "unknown" in msg
    accepted = accepted_part(msg.split(key_path, 1)[1])
    for key in must_accept:
        assert re.search(rf"\b{key}\b", accepted), (key, msg)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(base(train={"lrr": 0.1})), encoding="utf-8")
    msg = config_error(path)
    assert str(path) in msg and "train.lrr" in msg and "unknown" in msg


def test_all_errors_are_reported_at_once():
    msg = config_error(base(train={"lr": -1, "schedule": "cosine_x"}, method={"rank": 4}))
    assert "train.lr" in msg and "train.schedule" in msg and "method.rank" in msg


# -- bad values ----------------------------------------------------------------

def test_bad_literal_value_names_key_value_and_choices():
    msg = config_error(base(train={"schedule": "cosine_x"}))
    assert "train.schedule" in msg and "cosine_x" in msg
    after = msg.split("'cosine_x'", 1)[1]  # the accepted values follow the value given
    for choice in ("constant", "linear", "cosine"):
        assert f"'{choice}'" in after, msg


@pytest.mark.parametrize("key, value, hint", [
    ("lr", -0.001, "greater than 0"),
    ("lr", 0, "greater than 0"),
    ("batch_size", 0, "greater than or equal to 1"),
    ("warmup", -1, "greater than or equal to 0"),
])
def test_out_of_range_numbers(key, value, hint):
    msg = config_error(base(train={key: value}))
    assert f"train.{key}" in msg and repr(value) in msg and hint in msg


def test_bad_task():
    msg = config_error(base(task="foo"))
    assert re.search(r"^\s*task: 'foo'", msg, re.M), msg
    assert "text-classification" in msg and "causal-lm" in msg


def test_bad_method_name():
    msg = config_error(base(method={"name": "nope"}))
    assert "method.name" in msg and "nope" in msg and "'lora'" in msg


def test_monitor_must_be_a_metric_of_the_task():
    msg = config_error(base(eval={"monitor": "bleu"}))
    assert "eval.monitor" in msg and "bleu" in msg
    for metric in ("accuracy", "macro_f1", "loss"):
        assert metric in accepted_part(msg)
    # accuracy is a classification metric, not a causal-lm one
    msg = config_error(base("causal-lm", eval={"monitor": "accuracy"}))
    assert "eval.monitor" in msg and "'accuracy'" in msg and "perplexity" in accepted_part(msg)
    assert load_config(base("causal-lm", eval={"monitor": "perplexity"})).monitor == "perplexity"


def test_metrics_must_belong_to_the_task():
    msg = config_error(base(eval={"metrics": ["accuracy", "perplexity"]}))
    assert "eval.metrics" in msg and "'perplexity'" in msg and "macro_f1" in accepted_part(msg)


@pytest.mark.parametrize("missing, key", [("model", "model"), ("task", "task"), ("data", "data")])
def test_missing_required_key(missing, key):
    data = base()
    del data[missing]
    msg = config_error(data)
    assert re.search(rf"^\s*{key}: required key is missing", msg, re.M), msg


def test_missing_nested_required_key():
    msg = config_error({"task": "causal-lm", "model": {"max_length": 64}, "data": {"train": "x.jsonl"}})
    assert "model.name: required key is missing" in msg


def test_resolved_defaults():
    cls = load_config(base())
    assert (cls.monitor, cls.higher_is_better) == ("accuracy", True)
    lm = load_config(base("causal-lm"))
    assert (lm.monitor, lm.higher_is_better) == ("loss", False)
    assert load_config(base(eval={"monitor": "loss"})).higher_is_better is False
    assert load_config(base(eval={"monitor": "loss", "mode": "max"})).higher_is_better is True


def test_method_default_lr_applies_only_when_lr_is_not_set(tmp_path):
    from slimtune.config import dump_config
    from slimtune.methods import REGISTRY

    # LoRA has no rate of its own: the task's, 2e-3 with a new head, 5e-4 for a causal LM
    assert REGISTRY["lora"].default_lr is None
    for task in ("text-classification", "regression", "multi-label-classification", "token-classification",
                 "image-classification"):
        assert load_config(base(task)).train.lr == pytest.approx(2e-3), task
    assert load_config(base("causal-lm")).train.lr == pytest.approx(5e-4)
    assert load_config(base("causal-lm", method={"name": "dora"})).train.lr == pytest.approx(5e-4)
    probe = REGISTRY["head-only"].default_lr
    assert probe is not None and probe > 2e-3
    assert load_config(base(method={"name": "head-only"})).train.lr == pytest.approx(probe)
    assert load_config(base(method={"name": "full"})).train.lr < 5e-4
    # set in the config, in an override or in another train key's presence: the user's value wins
    assert load_config(base(method={"name": "head-only"}, train={"lr": 1e-4})).train.lr == pytest.approx(1e-4)
    assert load_config(base(method={"name": "head-only"}), ["train.lr=2e-4"]).train.lr == pytest.approx(2e-4)
    cfg = load_config(base(method={"name": "head-only"}, train={"batch_size": 8}))
    assert cfg.train.lr == pytest.approx(probe)
    # the resolved value is written out, so the saved config reproduces the run
    path = tmp_path / "again.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(path).train.lr == pytest.approx(probe)


def test_model_may_be_given_as_its_name(tmp_path):
    """`model: org/name`, as other trainers' configs write it, is model.name; the resolved config says model.name."""
    from slimtune.config import dump_config

    cfg = load_config({**base(), "model": "sentence-transformers/all-MiniLM-L6-v2"})
    assert cfg.model.name == "sentence-transformers/all-MiniLM-L6-v2" and cfg.model.max_length == 256
    assert (cfg.model_dump(mode="json", exclude_unset=True)["model"]
            == {"name": "sentence-transformers/all-MiniLM-L6-v2"})
    saved = yaml.safe_load(dump_config(cfg))
    assert saved["model"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert saved["model"]["trust_remote_code"] is False
    path = tmp_path / "plain.yaml"
    path.write_text("task: text-classification\nmodel: org/model\ndata: {train: t.csv}\n", encoding="utf-8")
    assert load_config(path).model.name == "org/model"
    assert load_config(path, ["model.max_length=64"]).model.max_length == 64  # an override finds the section


@pytest.mark.parametrize("name", ["..", "a/../../x", "/tmp/x", ".", "a\\b", "runs/x", ""])
def test_output_name_must_be_a_plain_folder_name(name, tmp_path):
    msg = flat(config_error(base(output={"dir": str(tmp_path / "runs"), "name": name})))
    assert f"output.name: {name!r} is not accepted: must be a plain folder name, created under output.dir" in msg
    assert "my-run-1" in msg
    assert not (tmp_path / "runs").exists()


def test_a_plain_output_name_works_and_the_run_folder_stays_inside(tmp_path):
    from types import SimpleNamespace

    from slimtune.track.rundir import new_run_dir

    cfg = load_config(base(output={"dir": str(tmp_path / "runs"), "name": "my-run_1.v2"}))
    assert new_run_dir(cfg) == tmp_path / "runs" / "my-run_1.v2"
    # a config that skipped the loader's check (built in code) still cannot leave output.dir
    for name in ("../escape", str(tmp_path / "abs"), "a/b"):
        bad = SimpleNamespace(output=SimpleNamespace(dir=str(tmp_path / "runs"), name=name))
        with pytest.raises(ConfigError, match="output.name: .* must be a plain folder name"):
            new_run_dir(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and not (tmp_path / "runs" / "a").exists()


def test_bad_files(tmp_path):
    assert "does not exist" in config_error(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n", encoding="utf-8")
    msg = config_error(bad)
    assert str(bad) in msg and "not valid YAML" in msg
    listy = tmp_path / "list.yaml"
    listy.write_text("- task\n- model\n", encoding="utf-8")
    msg = config_error(listy)
    assert str(listy) in msg and "mapping" in msg


def test_round_trip_through_dump(tmp_path):
    from slimtune.config import dump_config

    cfg = load_config(base(train={"lr": 1e-3}, method={"r": 4}))
    path = tmp_path / "again.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(path) == cfg


# -- the examples ----------------------------------------------------------------

def test_examples_exist():
    assert EXAMPLES, f"no examples/*.yaml under {ROOT}"


def _missing_data(cfg: RunConfig) -> str | None:
    """Why an example's data cannot be read here, or None."""
    for src in filter(None, (cfg.data.train, cfg.data.eval, cfg.data.test)):
        if src.startswith("builtin:chatterbot"):
            if importlib.util.find_spec("chatterbot_corpus") is None:
                return f"{src} needs the chatterbot_corpus package (pip install chatterbot-corpus)"
        elif src.startswith("hf:"):
            return f"{src} needs the Hugging Face Hub (tests run offline)"
        elif not src.startswith("builtin:") and not (ROOT / src).expanduser().exists():
            return f"{src} is not in the checkout"
    return None


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name and cfg.data.train


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_cli_validate(path, runner, monkeypatch):
    cfg = load_config(path)
    reason = _missing_data(cfg)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(ROOT)  # example data paths are relative to the repository root
    result = runner.invoke(app, ["validate", str(path)])
    out = flat(result.output)
    assert result.exit_code == 0, out
    assert f"config ok: task={cfg.task} model={cfg.model.name} method={cfg.method.name}" in out
    m = re.search(r"data ok: train=(\d+) eval=(\d+)", out)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, out


# -- CLI -------------------------------------------------------------------------

def test_schema_prints_json_schema(runner):
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert set(SECTIONS) <= set(schema["properties"])
    assert {"task", "model", "data"} <= set(schema["required"])
    assert schema.get("additionalProperties") is False

    def section(prop: dict) -> dict:  # a section's own schema, through its $ref (or the $ref among its variants)
        refs = [prop] + prop.get("anyOf", []) + prop.get("allOf", [])
        ref = next(r["$ref"] for r in refs if "$ref" in r)
        return schema["$defs"][ref.split("/")[-1]]

    # the facts the README's config reference states, with their help text
    assert set(schema["properties"]["task"]["enum"]) == {"text-classification", "causal-lm", "image-classification",
                                                        "regression", "multi-label-classification",
                                                        "token-classification"}
    train = section(schema["properties"]["train"])
    assert train["additionalProperties"] is False
    defaults = {k: train["properties"][k].get("default") for k in
                ("batch_size", "grad_accum", "schedule", "warmup", "weight_decay", "max_grad_norm", "seed", "precision",
                 "log_every", "epochs")}
    assert defaults == {"batch_size": 16, "grad_accum": 1, "schedule": "linear", "warmup": 0.06, "weight_decay": 0.01,
                        "max_grad_norm": 1.0, "seed": 42, "precision": "auto", "log_every": 10, "epochs": 3}
    assert train["properties"]["schedule"]["enum"] == ["constant", "linear", "cosine"]
    assert train["properties"]["precision"]["enum"] == ["auto", "bf16", "fp16", "fp32"]
    assert train["properties"]["batch_size"]["minimum"] == 1
    assert "per device" in train["properties"]["batch_size"]["description"]
    assert "fraction" in train["properties"]["warmup"]["description"]
    # method: one variant per name, discriminated by `name`; LoRA's defaults are r 8, alpha 16 on the block linears
    method = schema["properties"]["method"]
    assert method["discriminator"]["propertyName"] == "name"
    assert {"lora", "dora", "rslora", "pissa", "olora", "eva", "lora-plus", "qlora", "adalora", "vera", "loha", "lokr",
            "oft", "boft", "ia3", "prompt-tuning", "p-tuning", "prefix-tuning", "bitfit", "last-n-layers", "head-only",
            "full"} == set(method["discriminator"]["mapping"])
    lora = schema["$defs"][method["discriminator"]["mapping"]["lora"].split("/")[-1]]
    assert ({k: lora["properties"][k]["default"] for k in ("r", "alpha", "targets")}
            == {"r": 8, "alpha": 16, "targets": "auto"})
    assert lora["properties"]["r"]["minimum"] == 1 and "rank" in lora["properties"]["r"]["description"]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Record any attempt to resolve a model or load a tokenizer / data during `run`."""
    import slimtune.loading as loading
    import slimtune.models as models

    calls = []

    def recorder(name):
        def fn(*args, **kwargs):
            calls.append((name, args))
            raise RuntimeError(f"{name} called")
        return fn

    monkeypatch.setattr(loading, "resolve", recorder("resolve"))
    monkeypatch.setattr(models, "load_tokenizer", recorder("load_tokenizer"))  # the tasks' load_processor
    return calls


def test_cli_run_config_error_exits_2_before_model(tmp_path, runner, no_model_loading):
    path = tmp_path / "bad.yaml"
    cfg = base(train={"lrr": 0.1})
    cfg["model"]["name"] = "no-such-org/definitely-not-a-model"
    cfg["data"]["train"] = str(tmp_path / "absent.csv")
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = runner.invoke(app, ["run", str(path)])
    out = flat(result.output)
    assert result.exit_code == 2, out
    assert "error:" in out and "train.lrr" in out and "unknown" in out
    assert re.search(r"\blr\b", accepted_part(out))
    # the config is rejected before the data or the model is touched
    assert "no-such-org" not in out and "absent.csv" not in out and "not found" not in out
    assert no_model_loading == []
    assert not (tmp_path / "runs").exists()


def test_cli_run_bad_override_exits_2(tmp_path, runner, no_model_loading):
    path = tmp_path / "ok.yaml"
    cfg = base()
    cfg["model"]["name"] = "no-such-org/definitely-not-a-model"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = runner.invoke(app, ["run", str(path), "method.rank=4"])
    out = flat(result.output)
    assert result.exit_code == 2, out
    assert "method.rank" in out and "unknown" in out
    assert no_model_loading == []

    result = runner.invoke(app, ["run", str(path), "train..lr=1"])
    assert result.exit_code == 2 and "'train..lr=1'" in flat(result.output)


def test_cli_validate_reports_config_error(tmp_path, runner):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base(train={"schedule": "cosine_x"})), encoding="utf-8")
    result = runner.invoke(app, ["validate", str(path)])
    out = flat(result.output)
    assert result.exit_code == 2
    assert "train.schedule" in out and "cosine_x" in out
