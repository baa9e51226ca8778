"""timm `save_for_hf` directories in, against timm's own logits (tests/fixtures/timm, made
by timm itself: timm does not import in this venv)."""

import json
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from tests.conftest import ROOT, load_config
from vitpod import evaluate, export, inference, model, predict, train
from vitpod.data import transforms
from vitpod.errors import UserError
from vitpod.formats import detect

FIXTURES = ROOT / "tests" / "fixtures" / "timm"
IMPORTED = {"vit_tiny_labels": ("w48-d2-h4-m96/8", 32, ("cat", "dog", "fish", "bird", "frog")),
            "vit_small_imagenet_norm": ("w36-d3-h3-m144/4", 24, tuple("0123456789")),
            "vit_base_bin": ("w32-d1-h2-m96/7", 28, ("no", "maybe", "yes"))}


def _expected(name):
    return json.loads((FIXTURES / name / "expected_logits.json").read_text())


@pytest.mark.parametrize("name", sorted(IMPORTED))
def test_timm_checkpoints_give_timms_logits_on_timms_inputs(name):
    classifier = inference.load(str(FIXTURES / name))
    variant, size, labels = IMPORTED[name]
    assert (classifier.model_cfg.variant, classifier.data_cfg.image_size) == (variant, size)
    assert classifier.classes == labels and classifier.model_cfg.gelu == "exact"
    inputs = np.load(FIXTURES / name / "inputs.npy").transpose(0, 2, 3, 1)  # normalised
    graphdef, _ = model.abstract_model(classifier.model_cfg, size, len(labels))
    ours = np.asarray(model.apply(graphdef, classifier.params, inputs))
    expected = np.asarray(_expected(name)["logits"])
    print(f"{name} on timm's inputs: max |ours - timm| = {abs(ours - expected).max():.2e}")
    np.testing.assert_allclose(ours, expected, atol=1e-4)


@pytest.mark.parametrize("name", sorted(IMPORTED))
def test_timm_checkpoints_preprocess_as_timm_and_give_its_logits_on_images(name):
    classifier = inference.load(str(FIXTURES / name))
    expected = _expected(name)
    files = [str(FIXTURES / image) for image in expected["images"]]
    data = classifier.data_cfg
    images = np.stack([transforms.eval_transform(Image.open(f).convert("RGB"), data.image_size,
                                                 data.eval_crop_pct, False,
                                                 data.eval_interpolation) for f in files])
    normalised = (images / 255.0 - np.asarray(data.mean)) / np.asarray(data.std)
    inputs = np.load(FIXTURES / name / "inputs.npy").transpose(0, 2, 3, 1)
    np.testing.assert_allclose(normalised, inputs, atol=1e-5)
    ours = classifier.logits(images)
    print(f"{name} on images: max |ours - timm| = "
          f"{abs(ours - np.asarray(expected['logits'])).max():.2e}")
    np.testing.assert_allclose(ours, expected["logits"], atol=1e-4)
    probs = np.exp(expected["logits"]) / np.exp(expected["logits"]).sum(-1, keepdims=True)
    rows = predict.predict(classifier, files, top_k=1)
    assert [r["top_k"][0]["label"] for r in rows] == [classifier.classes[i] for i in
                                                      probs.argmax(-1)]
    np.testing.assert_allclose([r["top_k"][0]["prob"] for r in rows], probs.max(-1), atol=1e-5)


def test_evaluate_reads_a_timm_directory(tmp_path):
    name = "vit_small_imagenet_norm"  # its classes "0".."9" sort as an ImageFolder's do
    expected = _expected(name)
    shown = [i % 4 for i in range(10)]  # class c holds image c % 4
    for c, i in enumerate(shown):
        (tmp_path / str(c)).mkdir()
        Image.open(FIXTURES / expected["images"][i]).save(tmp_path / str(c) / "x.png")
    result = evaluate.evaluate_classifier(inference.load(str(FIXTURES / name)), str(tmp_path),
                                          4)
    logits = np.asarray(expected["logits"])[shown]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert result["count"] == 10
    assert result["loss"] == pytest.approx(-log_probs[range(10), range(10)].mean(), abs=1e-4)
    assert result["accuracy"] == np.mean(logits.argmax(-1) == np.arange(10))


def test_timm_export_loads_in_transformers_with_timms_logits(tmp_path):
    name = "vit_tiny_labels"
    export.run(str(FIXTURES / name), str(tmp_path))
    exported = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert exported.config.id2label == dict(enumerate(IMPORTED[name][2]))
    with torch.no_grad():
        theirs = exported(torch.from_numpy(np.load(FIXTURES / name / "inputs.npy"))).logits
    np.testing.assert_allclose(theirs.numpy(), _expected(name)["logits"], atol=1e-4)
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["resample"] == 3  # bicubic, as the timm model's pretrained_cfg


def test_fine_tunes_from_a_timm_directory(tmp_path, colors):
    config = load_config("tiny", data__train_dir=str(colors / "train"),
                         data__val_dir=str(colors / "val"),
                         model__init_from=str(FIXTURES / "vit_small_imagenet_norm"))
    assert train.run(config, str(tmp_path / "run"))["eval/count"] == 37
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert (saved["variant"], saved["layer_norm_eps"]) == ("w36-d3-h3-m144/4", 1e-6)


def test_pytorch_model_bin_without_torch_says_how_to_convert(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
    with pytest.raises(UserError, match=r"pytorch_model.bin needs torch to read; convert it "
                                        r"once .*save_file"):
        detect.read(str(FIXTURES / "vit_base_bin"))


@pytest.mark.parametrize("name,message", [
    ("refuse_avg_pool", r"global_pool='avg' \(vitpod pools the class token\)"),
    ("refuse_reg_tokens", r"4 register tokens \(reg_tokens\)"),
    ("refuse_layer_scale", r"layer scale \(init_values=1e-05\)"),
    ("refuse_no_class_token", r"no class token \(class_token=False\)"),
    ("refuse_deit_distilled", r"architecture 'deit_tiny_distilled_patch16_224'.*distillation"),
])
def test_unsupported_timm_models_are_refused_naming_what(name, message):
    with pytest.raises(UserError, match=message) as error:
        inference.load(str(FIXTURES / name))
    assert "unsupported timm model" in str(error.value) and "\n" not in str(error.value)


def test_unsupported_timm_tensors_are_refused_even_when_the_config_is_silent(tmp_path):
    for name in ("refuse_reg_tokens", "refuse_layer_scale", "refuse_deit_distilled"):
        config = json.loads((FIXTURES / name / "config.json").read_text())
        config.update(architecture="vit_tiny_patch16_224", model_args={"num_heads": 2})
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        (tmp_path / name / "model.safetensors").write_bytes(
            (FIXTURES / name / "model.safetensors").read_bytes())
        with pytest.raises(UserError, match="unsupported timm model: .*(register tokens|layer "
                                            "scale|a distillation token)"):
            detect.read(str(tmp_path / name))
