"""Hugging Face ViT checkpoints in and out, against transformers' PyTorch ViT."""

import json
import logging
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from tests.conftest import ROOT, load_config
from vitpod import config, config_record, export, inference, model, predict, train
from vitpod.errors import UserError
from vitpod.formats import detect, hf

# vitpod variant -> the HF shape of a random checkpoint built here (no hub). The last
# three have no name: the architecture comes from the checkpoint's config.json.
SHAPES = {"pico/4": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, patch_size=4),
          "mu/4": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=128, patch_size=4),
          "pico/2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, patch_size=2),
          "w48-d3-h4-m96/4": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=96, patch_size=4),
          "w24-d1-h3-m40/2": dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=3,
                                  intermediate_size=40, patch_size=2),
          "w40-d2-h5-m72/8": dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                                  intermediate_size=72, patch_size=8)}


def _hf_model(path, variant="pico/4", image_size=8, labels=("a", "b", "c", "d"), seed=0,
              hidden_act="gelu"):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=image_size, id2label=dict(enumerate(labels)),
                                 label2id={c: i for i, c in enumerate(labels)},
                                 hidden_act=hidden_act, **SHAPES[variant])
    m = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases: randomise all to test every tensor, with
        for name, p in m.named_parameters():  # weights large enough to tell GELUs apart
            p.normal_(0, 0.5 if p.ndim > 1 or "layernorm" in name else 0.2)
    m.save_pretrained(path)
    return m


def _model_cfg(variant):
    cfg = load_config("tiny").model
    cfg.variant, cfg.layer_norm_eps = variant, 1e-12
    return cfg


def _torch_logits(m, images_nhwc, interpolate=False):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        return m(x, interpolate_pos_encoding=interpolate).logits.numpy()


@pytest.mark.parametrize("variant,image_size,hidden_act", [
    ("pico/4", 8, "gelu"), ("mu/4", 16, "gelu"), ("pico/2", 8, "gelu"),
    ("w48-d3-h4-m96/4", 12, "gelu"), ("w24-d1-h3-m40/2", 6, "gelu_pytorch_tanh"),
    ("w40-d2-h5-m72/8", 16, "gelu_new")])
def test_imported_checkpoint_of_any_shape_gives_pytorch_logits(tmp_path, variant, image_size,
                                                               hidden_act):
    m = _hf_model(tmp_path, variant, image_size, hidden_act=hidden_act)
    classifier = inference.load(str(tmp_path))  # architecture from its config.json
    assert classifier.model_cfg.variant == variant
    assert classifier.model_cfg.gelu == ("exact" if hidden_act == "gelu" else "tanh")
    x = np.random.default_rng(0).integers(0, 256, (3, image_size, image_size, 3), np.uint8)
    normalised = ((x / 255.0 - 0.5) / 0.5).astype(np.float32)
    ours, theirs = classifier.logits(x), _torch_logits(m, normalised)
    print(f"{variant} {hidden_act}: max |ours - transformers| = {abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("variant,gelu", [("w48-d3-h4-m96/4", "exact"),
                                          ("w24-d1-h3-m40/2", "tanh")])
def test_any_shape_exports_to_transformers_with_the_same_logits(tmp_path, variant, gelu):
    cfg = load_config("tiny", model__variant=variant, model__gelu=gelu,
                      model__layer_norm_eps=1e-12, data__image_size=8)
    graphdef, abstract = model.abstract_model(cfg.model, 8, 3)
    rng = np.random.default_rng(0)  # random everything, the zero head included
    params = jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(np.float32), abstract)
    hf.export(params, cfg.model, cfg.data, ("x", "y", "z"), str(tmp_path))
    exported = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert exported.config.hidden_act == {"exact": "gelu", "tanh": "gelu_pytorch_tanh"}[gelu]
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    ours, theirs = np.asarray(model.apply(graphdef, params, x)), _torch_logits(exported, x)
    print(f"{variant} {gelu}: max |ours - exported| = {abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_export_run_converts_a_checkpoint_directory(tmp_path):
    m = _hf_model(tmp_path / "in", "w48-d3-h4-m96/4", 12, hidden_act="gelu_pytorch_tanh")
    export.run(str(tmp_path / "in"), str(tmp_path / "out"))
    exported = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    x = np.random.default_rng(3).normal(size=(2, 12, 12, 3)).astype(np.float32)
    np.testing.assert_allclose(_torch_logits(exported, x), _torch_logits(m, x), atol=1e-4)


def test_position_embeddings_resize_like_interpolate_pos_encoding(tmp_path):
    m = _hf_model(tmp_path, "pico/4", image_size=8)  # 2x2 patch grid -> 4x4 at 16 px
    cfg = _model_cfg("pico/4")
    params = hf.load_params(detect.read(str(tmp_path)), cfg, 16, ("a", "b", "c", "d"))
    assert params["pos_embed"].shape == (1, 17, 32)
    graphdef, _ = model.abstract_model(cfg, 16, 4)
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model.apply(graphdef, params, x)),
                               _torch_logits(m, x, interpolate=True), atol=1e-4)


def test_other_classes_get_a_zero_head(tmp_path):
    _hf_model(tmp_path)
    params = hf.load_params(detect.read(str(tmp_path)), _model_cfg("pico/4"), 8, ("x", "y"))
    assert params["head"]["kernel"].shape == (32, 2) and not params["head"]["kernel"].any()


def test_init_from_says_in_one_line_which_keys_the_checkpoint_changes(tmp_path, caplog):
    _hf_model(tmp_path, "w48-d3-h4-m96/4", hidden_act="gelu_new")
    cfg = load_config("tiny").model  # pico/4, exact GELU, eps 1e-6
    with caplog.at_level(logging.WARNING):
        detect.adopt(cfg, detect.read(str(tmp_path)))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1
    assert "model.variant='w48-d3-h4-m96/4' (config: 'pico/4')" in lines[0]
    assert "model.gelu='tanh' (config: 'exact')" in lines[0]
    assert "model.layer_norm_eps=1e-12 (config: 1e-06)" in lines[0]
    assert (cfg.variant, cfg.gelu, cfg.layer_norm_eps) == ("w48-d3-h4-m96/4", "tanh", 1e-12)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same spelled otherwise: nothing to say
        cfg.variant = "w48-d3-h4-m96/4"
        detect.adopt(cfg, detect.read(str(tmp_path)))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_variant_names_and_free_form_shapes():
    assert model.parse_variant("w48-d3-h4-m96/8") == model.ViTShape(48, 3, 4, 96, 8)
    assert model.parse_variant("So400m/14") == model.ViTShape(1152, 27, 16, 4304, 14)
    assert model.parse_variant("e/14") == model.ViTShape(1792, 56, 16, 15360, 14)
    assert model.variant_name(model.ViTShape(768, 12, 12, 3072, 16)) == "B/16"
    assert model.variant_name(model.ViTShape(48, 3, 4, 96, 8)) == "w48-d3-h4-m96/8"
    for bad in ("B", "X/16", "w48-d3-h4/8", "w48-d3-h4-m96/0", "b/16"):
        with pytest.raises(UserError, match="wWIDTH-dDEPTH-hHEADS-mMLP/PATCH"):
            model.parse_variant(bad)
    with pytest.raises(UserError, match="width 48 is not a multiple of the 5 heads"):
        model.parse_variant("w48-d3-h5-m96/8")


def test_mismatched_checkpoints_are_refused_in_one_line(tmp_path):
    _hf_model(tmp_path)
    with pytest.raises(UserError, match=r"has model.variant='pico/4' \(config: 'mu/4'\)"):
        hf.load_params(detect.read(str(tmp_path)), _model_cfg("mu/4"), 8, ("a",))
    weights = tmp_path / hf.WEIGHTS
    import safetensors.numpy

    tensors = safetensors.numpy.load_file(weights)
    tensors.pop("vit.layernorm.weight")
    tensors["vit.extra.weight"] = np.zeros(3, np.float32)
    safetensors.numpy.save_file(tensors, weights)
    with pytest.raises(UserError, match=r"missing tensors \['layernorm.weight'\], unexpected "
                                        r"tensors \['extra.weight'\]"):
        hf.load_params(detect.read(str(tmp_path)), _model_cfg("pico/4"), 8, ("a",))
    config = json.loads((tmp_path / hf.CONFIG).read_text())
    (tmp_path / hf.CONFIG).write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(UserError, match=r"config.json: unsupported hidden_act='relu'"):
        detect.read(str(tmp_path))


def test_hub_id_without_internet_names_the_id_and_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot download 'google/vit-base-patch16-224'.*"
                                        "pass the directory"):
        hf.resolve("google/vit-base-patch16-224")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, colors):
    """A tiny HF checkpoint of a shape without a name fine-tuned on the colors data with
    configs/tiny.py (pico/4, exact GELU: the checkpoint's architecture wins), then exported."""
    root = tmp_path_factory.mktemp("ft")
    _hf_model(root / "pretrained", "w48-d3-h4-m96/4", labels=tuple("0123456789"),
              hidden_act="gelu_new")
    config = load_config("tiny", data__train_dir=str(colors / "train"),
                         data__val_dir=str(colors / "val"),
                         model__init_from=str(root / "pretrained"))
    final = train.run(config, str(root / "run"))
    export.run(str(root / "run"), str(root / "exported"))
    return root, final


def test_finetune_export_and_transformers_agree_on_logits(finetuned, colors):
    root, final = finetuned
    assert final["eval/count"] == 37
    saved = json.loads((root / "run" / "config.json").read_text())["model"]
    assert (saved["variant"], saved["gelu"], saved["layer_norm_eps"]) == (
        "w48-d3-h4-m96/4", "tanh", 1e-12)
    ours = inference.load(str(root / "run"))
    exported = transformers.ViTForImageClassification.from_pretrained(root / "exported").eval()
    assert exported.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
    assert exported.config.hidden_act == "gelu_pytorch_tanh"
    x = np.random.default_rng(2).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    normalised = ((x / 255.0 - 0.5) / 0.5).astype(np.float32)
    np.testing.assert_allclose(_torch_logits(exported, normalised), ours.logits(x), atol=1e-4)


def test_transformers_pipeline_predicts_the_class_names(finetuned, colors):
    root, _ = finetuned
    pipe = transformers.pipeline("image-classification", model=str(root / "exported"))
    files = sorted((colors / "val" / "c").iterdir())[:3]
    ours = predict.predict(inference.load(str(root / "exported")), [str(f) for f in files], 4)
    for path, mine in zip(files, ours, strict=True):
        theirs = pipe(Image.open(path).convert("RGB"), top_k=4)
        assert {t["label"] for t in theirs} == set("abcd")
        assert theirs[0]["label"] == mine["top_k"][0]["label"]
        assert theirs[0]["score"] == pytest.approx(mine["top_k"][0]["prob"], abs=1e-4)


def test_predict_cli_prints_json_per_image(finetuned, colors):
    root, _ = finetuned
    result = subprocess.run(
        [sys.executable, "-m", "vitpod.predict", f"--model={root / 'run'}", "--format=json",
         "--top_k=2", str(colors / "val" / "a")], capture_output=True, text=True, cwd=ROOT,
        timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 10 and all(len(r["top_k"]) == 2 for r in rows)
    for row in rows:
        probs = [t["prob"] for t in row["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_prepare_hf_writes_a_saved_dataset_as_an_imagefolder(tmp_path, monkeypatch):
    import datasets

    from vitpod import prepare
    from vitpod.data import imagefolder

    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["cat", "dog"])})
    rng = np.random.default_rng(0)

    def split(labels):
        images = [Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
                  for _ in labels]
        return datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)

    datasets.DatasetDict({"train": split([0, 1, 1, 0, 1]), "test": split([1, 0])}).save_to_disk(
        str(tmp_path / "saved"))
    counts = prepare.hf_dataset(str(tmp_path / "out"), str(tmp_path / "saved"))
    assert counts == {"train": 5, "val": 2}
    train = imagefolder.scan(str(tmp_path / "out" / "train"))
    assert train.classes == ("cat", "dog") and train.labels.count(1) == 3
    with Image.open(train.path(0)) as img:
        assert img.size == (5, 6)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load the dataset"):
        prepare.hf_dataset(str(tmp_path / "x"), str(tmp_path / "no-such-dataset"))


def test_workdirs_saved_before_the_gelu_key_resume_with_exact_gelu():
    saved = json.loads(config_record.to_json(config.defaults()))
    del saved["model"]["gelu"]
    assert config_record.from_json(saved).model.gelu == "exact"
    assert config_record.changed_result_keys(saved, config.defaults()) == []
    tanh = config.defaults()
    tanh.model.gelu = "tanh"
    assert config_record.changed_result_keys(saved, tanh) == ["model.gelu"]
