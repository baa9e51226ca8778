"""The attention's TPU program, compiled for a v5e topology on this CPU (needs libtpu): the
fused kernel in place of every attention matmul, no copies re-laying out q, k and v, and on
the XLA path a sequence too long for the kernel takes, bf16 matmul operands throughout."""

import math
import re

import pytest

from tests.conftest import load_config
from vitpod import attention, fused_attention, model
from vitpod.planning.compile import lower_train_step, tpu_devices

pytest.importorskip("libtpu", reason="compiling for TPUs needs libtpu: install the tpu extra")

# 16 px images in 4 px patches plus the class token: 17 tokens, a size nothing else has
# (width 32, 2 heads of 16, batch 64 over 4 chips: 16 rows per chip).
TOKENS, ROWS_PER_CHIP, WIDTH = 17, 16, 32


def _compiled_hlo(dtype: str = "bfloat16", attention: str = "auto") -> str:
    config = load_config("tiny", batch_size=64, data__image_size=16, model__dtype=dtype,
                         model__attention=attention)
    return lower_train_step(config, tpu_devices("v5e:2x2"), 5)[0].compile().as_text()


def _shapes(hlo: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every single-array instruction's (dtype, dims), by name (names are module-wide)."""
    return {name: (dtype, tuple(int(d) for d in dims.split(",") if d)) for name, dtype, dims in
            re.findall(r"%([\w.\-]+) = ([a-z]+\d*)\[([\d,]*)\]", hlo)}


def attention_matmuls(hlo: str) -> list[tuple[str, list[str]]]:
    """(output dtype, operand dtypes) of each matmul touching a (tokens x tokens) matrix: the
    attention's logits, its probabilities and their gradients."""
    shapes, found = _shapes(hlo), []
    for out_dtype, out_dims, args in re.findall(
            r"= ([a-z]+\d*)\[([\d,]*)\]\{?[^ ]* (?:dot|convolution)\(([^)]*)\)", hlo):
        operands = [shapes[a] for a in re.findall(r"%([\w.\-]+)", args) if a in shapes]
        dims = [tuple(int(d) for d in out_dims.split(",") if d)] + [d for _, d in operands]
        if any(list(d).count(TOKENS) >= 2 for d in dims):
            found.append((out_dtype, [t for t, _ in operands]))
    return found


def qkv_relayouts(hlo: str) -> list[str]:
    """Top-level copies of an array the size of one chip's q, k or v."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    size = ROWS_PER_CHIP * TOKENS * WIDTH
    return [line.strip()[:120] for line in entry.splitlines()
            if (m := re.search(r"= [a-z]+\d*\[([\d,]*)\]\S* copy\(", line))
            and math.prod(int(d) for d in m.group(1).split(",") if d) == size]


def fused_kernels(hlo: str) -> list[str]:
    """The Pallas kernels' custom calls at the top level of the program."""
    return re.findall(r'custom_call_target="tpu_custom_call"', hlo)


@pytest.fixture(scope="module")
def bf16_hlo():
    return _compiled_hlo()


@pytest.fixture(scope="module")
def xla_path_hlo():
    """The TPU step with XLA's attention (`model.attention=xla`; also where the kernel does
    not fit: a long sequence)."""
    return _compiled_hlo(attention="xla")


def test_tpu_attention_is_one_fused_kernel_each_way_per_layer(bf16_hlo):
    layers = model.parse_variant(load_config("tiny").model.variant).num_layers
    assert len(fused_kernels(bf16_hlo)) == 2 * layers  # forward and backward
    assert attention_matmuls(bf16_hlo) == []  # no (tokens x tokens) matrix outside them


def test_tpu_attention_projects_without_copies(bf16_hlo, xla_path_hlo):
    assert qkv_relayouts(bf16_hlo) == []
    assert qkv_relayouts(xla_path_hlo) == []


def test_bf16_attention_matmuls_take_no_f32_operand_on_tpus_xla_path(xla_path_hlo):
    assert fused_kernels(xla_path_hlo) == []
    matmuls = attention_matmuls(xla_path_hlo)
    assert len(matmuls) >= 2 * 5  # per layer: 2 forward, 3 or more backward
    assert [m for m in matmuls if "f32" in m[1]] == []


def test_the_checks_catch_the_cpu_layout_compiled_for_tpu(monkeypatch):
    """The heads-first layout (f32 logits, reshaped activations), which the CPU keeps, fails
    both checks when compiled for a TPU: they would notice it coming back there."""
    monkeypatch.setattr(attention, "_platform", lambda: "cpu")
    hlo = _compiled_hlo()
    assert [m for m in attention_matmuls(hlo) if "f32" in m[1]]
    assert qkv_relayouts(hlo)


@pytest.mark.parametrize("fused", [True, False], ids=["fused kernel", "xla path"])
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_the_tpu_layouts_compute_the_cpu_layouts_logits_and_gradients(monkeypatch, dtype,
                                                                       tolerance, fused):
    """Run here with the platform forced, the TPU's attention (the fused kernel, in Pallas's
    interpreter; or the per-head-kernel attention and its custom VJP) gives the heads-first
    attention's logits and parameter gradients (f32: float noise)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    config = load_config("tiny", data__image_size=16, model__dtype=dtype)
    graphdef, _ = model.abstract_model(config.model, 16, 5)
    params = model.init_params(config.model, 16, 5, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                          params)  # a non-zero head, so that every gradient flows
    images = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))

    kernel = fused_attention.attend
    monkeypatch.setattr(fused_attention, "fits", lambda *shape: fused)
    monkeypatch.setattr(fused_attention, "attend",  # the interpreter: no TPU here
                        lambda q, k, v, heads, interpret=False: kernel(q, k, v, heads, True))

    def loss_and_grads(platform):
        monkeypatch.setattr(attention, "_platform", lambda: platform)
        loss = lambda p: jnp.sum(jnp.sin(model.apply(graphdef, p, images)))  # noqa: E731
        return jax.value_and_grad(loss)(params)

    (loss_cpu, grads_cpu), (loss_tpu, grads_tpu) = loss_and_grads("cpu"), loss_and_grads("tpu")
    assert float(loss_tpu) == pytest.approx(float(loss_cpu), rel=tolerance, abs=tolerance)
    # Relative to the largest gradient: the key bias's is zero up to rounding (a constant
    # shift of each row of logits), so no per-leaf scale would do.
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_cpu))
    for a, b in zip(jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_tpu), strict=True):
        np.testing.assert_allclose(np.asarray(b, np.float32) / scale,
                                   np.asarray(a, np.float32) / scale, atol=tolerance)
