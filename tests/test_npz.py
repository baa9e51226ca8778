"""big_vision / vision_transformer .npz checkpoints in, against transformers' PyTorch ViT
with the same weights and the same (tanh) GELU."""

import logging
import os
import tempfile

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from google.cloud import storage as gcs_client

from tests.conftest import assert_params_close, load_config, read_params
from vitpod import inference, storage, train
from vitpod.errors import UserError
from vitpod.formats import detect, hf

_SHAPE = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
              patch_size=4)  # "w48-d3-h4-m96/4": no name
_MODULES = {"vision_transformer": ("LayerNorm_0", "MultiHeadDotProductAttention_1",
                                   "LayerNorm_2", "MlpBlock_3"),
            "big_vision": ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                           "MlpBlock_0")}


def _torch_vit(image_size=8, classes=4, seed=0):
    """A random HF ViT with flax's GELU and LayerNorm epsilon, as both repos train."""
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=image_size, hidden_act="gelu_pytorch_tanh",
                                 layer_norm_eps=1e-6, num_labels=classes, **_SHAPE)
    m = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():  # all random, weights large enough to tell GELUs apart
        for name, p in m.named_parameters():
            p.normal_(0, 0.5 if p.ndim > 1 or "layernorm" in name else 0.2)
    return m


def _flax_arrays(m, layout: str, scanned: bool = False) -> dict:
    """The torch model's weights under the flax names and layouts of `layout`."""
    with tempfile.TemporaryDirectory() as saved:  # its file names, as checkpoints have them
        m.save_pretrained(saved)
        sd = safetensors.numpy.load_file(os.path.join(saved, hf.WEIGHTS))
    sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    d, h = m.config.hidden_size, m.config.num_attention_heads
    pe, cls = sd["embeddings.position_embeddings"], sd["embeddings.cls_token"]
    out = {"embedding/kernel": sd["embeddings.patch_embeddings.projection.weight"].transpose(
               2, 3, 1, 0),
           "embedding/bias": sd["embeddings.patch_embeddings.projection.bias"],
           "Transformer/encoder_norm/scale": sd["layernorm.weight"],
           "Transformer/encoder_norm/bias": sd["layernorm.bias"],
           "head/kernel": sd["classifier.weight"].T, "head/bias": sd["classifier.bias"]}
    if layout == "vision_transformer":
        out["cls"], out["Transformer/posembed_input/pos_embedding"] = cls, pe
    else:  # posemb added before the class token joins: its entry moves into the token
        out["cls"], out["pos_embedding"] = cls + pe[:, :1], pe[:, 1:]
    ln1, mha, ln2, mlp = _MODULES[layout]
    blocks = []
    for i in range(m.config.num_hidden_layers):
        t = f"encoder.layer.{i}."
        block = {f"{ln1}/scale": sd[t + "layernorm_before.weight"],
                 f"{ln1}/bias": sd[t + "layernorm_before.bias"],
                 f"{ln2}/scale": sd[t + "layernorm_after.weight"],
                 f"{ln2}/bias": sd[t + "layernorm_after.bias"],
                 f"{mha}/out/kernel": sd[t + "attention.output.dense.weight"].T.reshape(
                     h, d // h, d),
                 f"{mha}/out/bias": sd[t + "attention.output.dense.bias"],
                 f"{mlp}/Dense_0/kernel": sd[t + "intermediate.dense.weight"].T,
                 f"{mlp}/Dense_0/bias": sd[t + "intermediate.dense.bias"],
                 f"{mlp}/Dense_1/kernel": sd[t + "output.dense.weight"].T,
                 f"{mlp}/Dense_1/bias": sd[t + "output.dense.bias"]}
        for n in ("query", "key", "value"):
            block[f"{mha}/{n}/kernel"] = sd[t + f"attention.attention.{n}.weight"].T.reshape(
                d, h, d // h)
            block[f"{mha}/{n}/bias"] = sd[t + f"attention.attention.{n}.bias"].reshape(h, d // h)
        blocks.append(block)
    for i, block in enumerate(blocks):
        for k, v in block.items():
            if scanned:
                out[f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
            else:
                out[f"Transformer/encoderblock_{i}/{k}"] = v
    return out


def _write(path, arrays: dict, prefix: str = "") -> str:
    np.savez(path, **{prefix + k: v for k, v in arrays.items()})
    return str(path)


def _torch_logits(m, images_nhwc, interpolate=False):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        return m(x, interpolate_pos_encoding=interpolate).logits.numpy()


@pytest.mark.parametrize("layout,scanned,prefix", [
    ("vision_transformer", False, ""), ("vision_transformer", False, "opt/target/"),
    ("big_vision", False, "params/"), ("big_vision", True, "params/")])
def test_npz_layouts_give_pytorch_logits(tmp_path, layout, scanned, prefix):
    m = _torch_vit()
    path = _write(tmp_path / "vit.npz", _flax_arrays(m, layout, scanned), prefix)
    classifier = inference.load(path)
    assert (classifier.model_cfg.variant, classifier.model_cfg.gelu) == ("w48-d3-h4-m96/4",
                                                                         "tanh")
    assert classifier.classes == ("0", "1", "2", "3")
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), np.uint8)
    normalised = ((x / 255.0 - 0.5) / 0.5).astype(np.float32)  # both repos' [-1, 1]
    ours, theirs = classifier.logits(x), _torch_logits(m, normalised)
    print(f"{layout} scanned={scanned}: max |ours - torch| = {abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_npz_position_embeddings_resize_and_new_classes_get_a_zero_head(tmp_path):
    m = _torch_vit()
    ckpt = detect.read(_write(tmp_path / "vit.npz", _flax_arrays(m, "big_vision")))
    cfg = load_config("tiny").model
    detect.adopt(cfg, ckpt)
    params = hf.load_params(ckpt, cfg, 16, ckpt.labels)  # 2x2 patch grid -> 4x4
    classifier = inference.Classifier(cfg, load_config("tiny", data__image_size=16).data,
                                      ckpt.labels, params, "resized")
    x = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), np.uint8)
    normalised = ((x / 255.0 - 0.5) / 0.5).astype(np.float32)
    np.testing.assert_allclose(classifier.logits(x), _torch_logits(m, normalised, True),
                               atol=1e-4)
    params = hf.load_params(ckpt, cfg, 8, ("cat", "dog"))
    assert params["head"]["kernel"].shape == (48, 2) and not params["head"]["kernel"].any()


def test_a_head_on_pre_logits_is_dropped_for_fine_tuning_and_refused_for_prediction(
        tmp_path, caplog):
    arrays = _flax_arrays(_torch_vit(), "vision_transformer")
    arrays["pre_logits/kernel"], arrays["pre_logits/bias"] = np.eye(48), np.zeros(48)
    path = _write(tmp_path / "vit.npz", arrays)
    with caplog.at_level(logging.WARNING):
        ckpt = detect.read(path)
    assert ckpt.labels == () and "pre_logits" in caplog.text
    cfg = load_config("tiny").model
    detect.adopt(cfg, ckpt)
    assert not hf.load_params(ckpt, cfg, 8, ("a", "b"))["head"]["kernel"].any()
    with pytest.raises(UserError, match="has no classifier head of its own"):
        inference.load(path)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update({"MAPHead_0/probe": np.zeros((1, 1, 48))}), r"a MAP head \(MAPHead_0\)"),
    (lambda a: a.pop("cls"), r"no class token 'cls' \(GAP or MAP pooling\)"),
    (lambda a: a.pop("pos_embedding"), r"position embeddings not stored \(sincos2d\)"),
    (lambda a: a.pop("Transformer/encoderblock_1/LayerNorm_1/scale"),
     r"array 'params/Transformer/encoderblock_1/LayerNorm_1/scale' missing"),
])
def test_unsupported_npz_checkpoints_are_refused_in_one_line(tmp_path, change, message):
    arrays = _flax_arrays(_torch_vit(), "big_vision")
    change(arrays)
    path = _write(tmp_path / "vit.npz", arrays, "params/")
    with pytest.raises(UserError, match=message) as error:
        detect.read(path)
    assert str(error.value).startswith(path) and "\n" not in str(error.value)


def test_fine_tunes_from_an_npz_in_a_bucket(gcs, tmp_path, colors):
    m = _torch_vit(classes=5)
    gcs.create_bucket("vitpod-npz")
    local = _write(tmp_path / "vit.npz", _flax_arrays(m, "big_vision", scanned=True), "params/")
    storage.write_bytes("gs://vitpod-npz/augreg/vit.npz", open(local, "rb").read())
    config = load_config("tiny", data__train_dir=str(colors / "train"),
                         data__val_dir=str(colors / "val"),
                         model__init_from="gs://vitpod-npz/augreg/vit.npz")
    final = train.run(config, str(tmp_path / "run"))
    assert final["eval/count"] == 37
    ours = inference.load(str(tmp_path / "run"))
    assert (ours.model_cfg.variant, ours.model_cfg.gelu) == ("w48-d3-h4-m96/4", "tanh")
    # A resume takes the architecture from the workdir and never reads the checkpoint again
    # (on a pod, every host of every relaunch would download it): gone, the run still ends
    # where the uninterrupted one did.
    resumed = str(tmp_path / "resumed")
    assert train.run(config, resumed, stop_after=3)["stopped"] == "stopped as asked"
    gcs_client.Client(project="test-project").bucket("vitpod-npz").blob("augreg/vit.npz").delete()
    assert train.run(config, resumed)["step"] == final["step"]
    assert_params_close(read_params(tmp_path / "run", final["step"]),
                        read_params(resumed, final["step"]), atol=0)
