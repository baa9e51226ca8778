"""Multi-head self-attention, laid out per backend at trace time.

On CPU the per-head matmuls run with heads ahead of the tokens (about 1.4x faster there than
jax.nn.dot_product_attention's layout), logits and softmax in f32. On TPU, when an image
fits a TensorCore's VMEM, the attention core is one fused kernel per image
(vitpod/fused_attention.py): no (tokens x tokens) matrix goes through HBM. Otherwise (GPU,
or a sequence too long for the kernel) the queries, keys and values come straight out of
(d, heads, head_dim) views of the stored kernels, as flax's DenseGeneral lays them out,
with a custom backward pass that keeps every matmul operand in the model's dtype
(docs/tpu_step.md). The params are HF's four (d, d) projections on every path, so
checkpoints and HF import/export do not depend on the backend.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from vitpod import fused_attention


def _platform() -> str:
    """The platform traced for: the mesh's (plan compiles for TPU on a CPU), else default."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


@jax.custom_vjp
def _attend(q_blhk, k_blhk, v_blhk):
    """softmax(q k^T) v per head, q already scaled: matmul operands in q's dtype (the MXU
    accumulates in f32 anyway), the softmax in f32."""
    return _attend_fwd(q_blhk, k_blhk, v_blhk)[0]


def _attend_fwd(q_blhk, k_blhk, v_blhk):
    logits = jnp.einsum("bqhk,bshk->bhqs", q_blhk, k_blhk)
    p_bhqs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q_blhk.dtype)
    o_blhk = jnp.einsum("bhqs,bshk->bqhk", p_bhqs, v_blhk)
    return o_blhk, (q_blhk, k_blhk, v_blhk, p_bhqs, o_blhk)


def _attend_bwd(residuals, do_blhk):
    # Keeps only the probabilities, in the matmul dtype; the softmax backward's row sum is
    # sum(do * o) over head_dim (as FlashAttention), not a pass over the (q, s) matrix.
    q_blhk, k_blhk, v_blhk, p_bhqs, o_blhk = residuals
    f32, dtype = jnp.float32, q_blhk.dtype
    dp_bhqs = jnp.einsum("bqhk,bshk->bhqs", do_blhk, v_blhk)
    rows_bhq = jnp.einsum("bqhk,bqhk->bhq", do_blhk.astype(f32), o_blhk.astype(f32))
    ds_bhqs = (p_bhqs.astype(f32) * (dp_bhqs.astype(f32) - rows_bhq[..., None])).astype(dtype)
    return (jnp.einsum("bhqs,bshk->bqhk", ds_bhqs, k_blhk),
            jnp.einsum("bhqs,bqhk->bshk", ds_bhqs, q_blhk),
            jnp.einsum("bhqs,bqhk->bshk", p_bhqs, do_blhk))


_attend.defvjp(_attend_fwd, _attend_bwd)


class Attention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, dtype, rngs: nnx.Rngs, fused: bool = True):
        """`fused`: on TPU, the fused kernel where it fits (`model.attention=auto`)."""
        self.num_heads, self.dtype, self.fused = num_heads, dtype, fused
        dense = lambda: nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)  # noqa: E731
        self.query, self.key, self.value, self.out = dense(), dense(), dense(), dense()

    def __call__(self, x_bld):
        platform, (_, length, d) = _platform(), x_bld.shape
        if platform == "cpu":
            return self._heads_first(x_bld)
        if platform == "tpu" and self.fused and fused_attention.fits(length, d, self.dtype):
            return self._fused(x_bld)
        return self._per_head_kernels(x_bld)

    def _heads_first(self, x_bld):
        # Heads ahead of the tokens for the two per-head matmuls: on CPU this runs the
        # attention core (fwd + bwd) ~1.4x faster than jax.nn.dot_product_attention's
        # (batch, length, heads, dim) layout (DESIGN.md, Model). Logits and softmax in f32.
        b, length, d = x_bld.shape
        head_dim = d // self.num_heads

        def heads(t_bld):  # (batch, heads, length, head_dim)
            return t_bld.reshape(b, length, self.num_heads, head_dim).transpose(0, 2, 1, 3)

        logits = jnp.einsum("bhqk,bhsk->bhqs", heads(self.query(x_bld)), heads(self.key(x_bld)),
                            preferred_element_type=jnp.float32) * head_dim**-0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(x_bld.dtype)
        o_bhlk = jnp.einsum("bhqs,bhsk->bhqk", weights, heads(self.value(x_bld)))
        return self.out(o_bhlk.transpose(0, 2, 1, 3).reshape(b, length, d))

    def _per_head_kernels(self, x_bld):
        # On TPU, reshaping (b, l, d) activations into heads costs layout copies: project
        # straight into heads through a (d, heads, head_dim) view of the stored kernels, as
        # flax's DenseGeneral does. The logits' scale is folded into the query kernel.
        d, h = x_bld.shape[-1], self.num_heads
        x_bld = x_bld.astype(self.dtype)

        def project(dense, scale=1.0):
            kernel, bias = self._weights(dense, scale)
            return (jnp.einsum("bld,dhk->blhk", x_bld, kernel.reshape(d, h, d // h))
                    + bias.reshape(h, d // h))

        o_blhk = _attend(project(self.query, (d // h) ** -0.5), project(self.key),
                         project(self.value))
        kernel = self.out.kernel[...].astype(self.dtype).reshape(h, d // h, d)
        return jnp.einsum("blhk,hkd->bld", o_blhk, kernel) + self.out.bias[...].astype(
            self.dtype)

    def _fused(self, x_bld):
        # The projections stay plain (b, l, d) matmuls: the kernel takes each head as a slice
        # of the width, so nothing is reshaped or copied. The logits' scale is folded into the
        # query projection.
        d, h = x_bld.shape[-1], self.num_heads
        x_bld = x_bld.astype(self.dtype)

        def project(dense, scale=1.0):
            kernel, bias = self._weights(dense, scale)
            return x_bld @ kernel + bias

        o_bld = fused_attention.attend(project(self.query, (d // h) ** -0.5),
                                       project(self.key), project(self.value), h)
        return self.out(o_bld)

    def _weights(self, dense, scale: float = 1.0):
        """A projection's (d, d) kernel and bias in the model's dtype, times `scale`."""
        return ((dense.kernel[...] * scale).astype(self.dtype),
                (dense.bias[...] * scale).astype(self.dtype))
