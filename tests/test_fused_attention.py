"""The fused attention kernel: its numbers (in Pallas's interpreter, against plain jnp), what
it tells XLA it costs, and that Mosaic compiles it for v4 and v5e chips (needs libtpu)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitpod import fused_attention

BATCH, LENGTH, WIDTH, HEADS = 2, 197, 128, 4  # ViT's 197 tokens: no multiple of a tile


def reference(q_bld, k_bld, v_bld):
    """softmax(q k^T) v per head, in plain jnp (f32 softmax, matmuls in the inputs' dtype)."""
    split = lambda t: t.reshape(BATCH, LENGTH, HEADS, -1)  # noqa: E731
    logits = jnp.einsum("bqhk,bshk->bhqs", split(q_bld), split(k_bld),
                        preferred_element_type=jnp.float32)
    p_bhqs = jax.nn.softmax(logits, axis=-1).astype(v_bld.dtype)
    return jnp.einsum("bhqs,bshk->bqhk", p_bhqs, split(v_bld)).reshape(q_bld.shape)


def _inputs(dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    return [jax.random.normal(k, (BATCH, LENGTH, WIDTH)).astype(dtype) for k in keys]


@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_the_kernel_gives_attention_and_its_gradients(dtype, tolerance):
    *qkv, do = _inputs(dtype)
    kernel = lambda q, k, v: fused_attention.attend(q, k, v, HEADS, True)  # noqa: E731
    (o, vjp), (o_ref, vjp_ref) = jax.vjp(kernel, *qkv), jax.vjp(reference, *qkv)
    for got, want in zip((o, *vjp(do)), (o_ref, *vjp_ref(do)), strict=True):
        assert got.dtype == want.dtype == dtype
        scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(got, np.float32) / scale,
                                   np.asarray(want, np.float32) / scale, atol=tolerance)


def test_the_kernel_is_deterministic():
    qkv = _inputs(jnp.float32)[:3]
    grads = lambda: jax.grad(lambda *a: jnp.sum(fused_attention.attend(  # noqa: E731
        *a, HEADS, True) ** 2), argnums=(0, 1, 2))(*qkv)
    for a, b in zip(grads(), grads(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vit_shapes_fit_and_long_sequences_fall_back():
    assert fused_attention.fits(197, 768, jnp.bfloat16)  # B/16 at 224 px
    assert fused_attention.fits(257, 1280, jnp.bfloat16)  # H/14 at 224 px
    assert fused_attention.fits(197, 768, jnp.float32)
    assert not fused_attention.fits(1025, 1024, jnp.bfloat16)  # L/14 at 448 px


@pytest.mark.parametrize("topology", ["v5e:2x2", "v4:2x2x1"])
def test_mosaic_compiles_it_and_xla_is_told_its_true_cost(topology):
    pytest.importorskip("libtpu", reason="compiling for TPUs needs libtpu: install the tpu extra")
    from vitpod.planning.compile import tpu_devices

    chip = jax.sharding.Mesh(tpu_devices(topology)[:1], ("data",))
    array = jax.ShapeDtypeStruct((BATCH, LENGTH, WIDTH), jnp.bfloat16,
                                 sharding=jax.sharding.NamedSharding(chip, jax.P()))
    loss = lambda *qkv: jnp.sum(fused_attention.attend(*qkv, HEADS) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(array, array, array).compile(
        ).as_text()
    costs = [json.loads("{" + c + "}") for c in re.findall(r'"cost_estimate":\{([^}]*)\}', hlo)]
    one = BATCH * LENGTH * WIDTH * 2  # bytes of one bf16 (batch, length, width) array
    matmul = 2 * BATCH * LENGTH * LENGTH * WIDTH  # flops of one (l x l x width) product
    # Forward reads q, k, v and writes o; backward reads q, k, v, dO and writes dQ, dK, dV.
    assert sorted((int(c["bytes_accessed"]), int(c["flops"])) for c in costs) == [
        (4 * one, 2 * matmul), (7 * one, 5 * matmul)]


@pytest.mark.parametrize("length,width,heads", [(197, 384, 6), (197, 768, 12), (257, 1280, 16)],
                         ids=["S/16", "B/16", "H/14"])
def test_vit_shapes_compile_for_the_smallest_vmem(length, width, heads):
    """Heads 64 and 80 lanes wide (H/14's straddle the 128-lane registers), on v4."""
    pytest.importorskip("libtpu", reason="compiling for TPUs needs libtpu: install the tpu extra")
    from vitpod.planning.compile import tpu_devices

    assert fused_attention.fits(length, width, jnp.bfloat16)
    chip = jax.sharding.Mesh(tpu_devices("v4:2x2x1")[:1], ("data",))
    array = jax.ShapeDtypeStruct((2, length, width), jnp.bfloat16,
                                 sharding=jax.sharding.NamedSharding(chip, jax.P()))
    loss = lambda *qkv: jnp.sum(fused_attention.attend(*qkv, heads) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(array, array, array).compile(
        ).as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 2
