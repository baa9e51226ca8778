"""Self-attention fused into one TPU kernel per image: no (tokens x tokens) matrix in HBM.

At ViT lengths (197 tokens at 224 px in 16 px patches) one image's queries, keys and values
for every head fit in a TensorCore's VMEM with room to spare. So a Pallas kernel per image
computes softmax(q k^T) v head by head, straight from the (batch, length, width)
activations the projections produce (a head is a static slice of the width), and its
backward pass recomputes the probabilities from q and k instead of reading them back:
FlashAttention's recomputation (Dao et al. 2022, https://arxiv.org/abs/2205.14135) without
its tiling, since a whole row of logits is in VMEM. What crosses HBM per layer is q, k, v
and o forward; q, k, v and dO in, dQ, dK and dV out backward: none of the probabilities,
logits and their gradients that XLA's attention writes and reads back (docs/tpu_step.md).

Matmul operands are in the activations' dtype with f32 accumulation, the softmax in f32,
as in XLA's layout. Off TPU the same kernel runs in Pallas's interpreter (tests).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# What the kernel may keep in VMEM at once. Compiling for v4 gives a kernel 16 MiB (its
# out-of-VMEM errors say "of 16.00M"); later chips have more. The budget leaves room for
# padding and each head's temporaries: every shape `fits` accepts compiles for v4, v5e, v5p
# and v6e (docs/tpu_step.md). Larger shapes (long sequences) take XLA's attention.
VMEM_BUDGET_BYTES = 12 * 2**20
_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def fits(length: int, width: int, dtype) -> bool:
    """Whether one image fits the kernel's VMEM budget: the backward's four inputs and three
    outputs, double-buffered, plus a few f32 (length x length) matrices of one head."""
    blocks = 2 * 7 * length * width * jnp.dtype(dtype).itemsize
    return blocks + 4 * length * length * 4 <= VMEM_BUDGET_BYTES


def _probabilities(q, k):
    logits = jax.lax.dot_general(q, k, _NT, preferred_element_type=_F32)
    exp = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return exp / jnp.sum(exp, axis=-1, keepdims=True)


def _heads(num_heads: int, width: int):
    size = width // num_heads
    return [(0, slice(None), slice(h * size, (h + 1) * size)) for h in range(num_heads)]


def _forward_kernel(num_heads, q_ref, k_ref, v_ref, o_ref):
    for head in _heads(num_heads, q_ref.shape[-1]):
        p = _probabilities(q_ref[head], k_ref[head]).astype(v_ref.dtype)
        o_ref[head] = jnp.dot(p, v_ref[head], preferred_element_type=_F32).astype(o_ref.dtype)


def _backward_kernel(num_heads, q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref):
    for head in _heads(num_heads, q_ref.shape[-1]):
        q, k, v, do = q_ref[head], k_ref[head], v_ref[head], do_ref[head]
        p = _probabilities(q, k)
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=_F32)
        ds = (p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))).astype(q.dtype)
        dq_ref[head] = jnp.dot(ds, k, preferred_element_type=_F32).astype(dq_ref.dtype)
        dk_ref[head] = jax.lax.dot_general(ds, q, _TN, preferred_element_type=_F32).astype(
            dk_ref.dtype)
        dv_ref[head] = jax.lax.dot_general(p.astype(do.dtype), do, _TN,
                                           preferred_element_type=_F32).astype(dv_ref.dtype)


def _per_image(kernel, num_heads, inputs, num_outputs, matmuls, interpret):
    """`kernel` over a grid of one image per step (the images split across a chip's
    TensorCores), with the cost XLA's scheduler and cost model are told: `matmuls`
    (length x length x width) products, one exp per logit, each array read or written once."""
    b, length, width = inputs[0].shape
    block = pl.BlockSpec((1, length, width), lambda i: (i, 0, 0))
    # Inside shard_map the outputs vary over the mesh axes as the activations do.
    array = jax.ShapeDtypeStruct(inputs[0].shape, inputs[0].dtype,
                                 manual_axis_type=jax.typeof(inputs[0]).mat)
    cost = pl.CostEstimate(
        flops=2 * matmuls * b * length * length * width,
        transcendentals=b * num_heads * length * length,
        bytes_accessed=(len(inputs) + num_outputs) * array.size * array.dtype.itemsize)
    return pl.pallas_call(
        functools.partial(kernel, num_heads), grid=(b,), in_specs=[block] * len(inputs),
        out_specs=[block] * num_outputs, out_shape=[array] * num_outputs,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=cost, interpret=interpret)(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def attend(q_bld, k_bld, v_bld, num_heads: int, interpret: bool = False):
    """softmax(q k^T) v for each head of (batch, length, width) arrays, q already scaled."""
    return _forward(q_bld, k_bld, v_bld, num_heads, interpret)[0]


def _forward(q_bld, k_bld, v_bld, num_heads, interpret):
    (o_bld,) = _per_image(_forward_kernel, num_heads, (q_bld, k_bld, v_bld), 1, 2, interpret)
    return o_bld, (q_bld, k_bld, v_bld)


def _backward(num_heads, interpret, residuals, do_bld):
    return tuple(_per_image(_backward_kernel, num_heads, (*residuals, do_bld), 3, 5,
                            interpret))


attend.defvjp(_forward, _backward)
