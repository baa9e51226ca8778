"""Config defaults, validation and values derived from them.

Every key a run can read is declared here with its default; config files in `configs/`
override them. Sub-configs (`data`, `model`, `optim`, `mesh`) go only to the module that
owns them, a single value to a module that needs one; the whole config goes only where all
of it is needed: the train step (seed, data, model, optim, mix, accumulation), the run's
record (`config_record`, `workdir/files`) and the hosts' agreement on it (`distributed`).
"""

import math

import ml_collections

from vitpod.errors import UserError

# Keys that change how a run is observed or scheduled, not the numbers it computes.
# Anything else differing from a workdir's config.json refuses to resume.
RESULT_NEUTRAL_KEYS = frozenset({
    "log_every", "eval_every", "save_every", "save_every_minutes", "keep_checkpoints",
    "compile_cache", "grad_accum_steps", "model.scan_layers", "model.remat",
    # The attention's implementation: on CPU always the same; on TPU the fused kernel and
    # XLA's attention agree to float noise, so a run may switch (say, to step around a kernel
    # problem on a chip) and resume from its checkpoint.
    "model.attention",
    "data.val_dir", "data.num_workers", "data.read_threads", "data.fetch_threads",
    "data.eval_batch_size", "lease_timeout_minutes",
    # Changes nothing unless an image is larger, and such a file is what it guards against.
    "data.max_image_pixels",
    # The layout: every layout computes the same steps (tested), and orbax restores into
    # whatever shardings the new mesh asks for, so a run may resume on another slice.
    "mesh.data", "mesh.fsdp", "mesh.dcn_data",
})


def defaults() -> ml_collections.ConfigDict:
    """All config keys with their defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 128  # global, over all hosts and devices
    c.total_steps = 1000
    # Each device's rows run as this many microbatches, gradients summed: the same update
    # with 1/N of the activation memory (may change between launches of a run).
    c.grad_accum_steps = 1
    c.log_every = 50
    c.eval_every = 500  # 0: only at the end
    c.save_every = 500
    c.save_every_minutes = 0.0  # also save when this much wall time passed (0: off)
    c.keep_checkpoints = 2  # the newest N saved; at least 1, the one a relaunch resumes from
    # JAX's persistent compile cache in WORKDIR/compile_cache (or $JAX_COMPILATION_CACHE_DIR,
    # e.g. a bucket shared by runs): a relaunch after preemption skips most compilation.
    c.compile_cache = True
    # Process 0 holds WORKDIR/lease.json while it trains, with a heartbeat every half minute:
    # a second run on the workdir is refused. A lease whose heartbeat is older than this (a
    # run killed outright) is taken over, with a warning (vitpod/workdir/lease.py).
    c.lease_timeout_minutes = 3.0

    c.data = ml_collections.ConfigDict()
    c.data.train_dir = ""
    c.data.val_dir = ""
    c.data.image_size = 224
    c.data.mean = (0.5, 0.5, 0.5)
    c.data.std = (0.5, 0.5, 0.5)
    c.data.crop_scale = (0.08, 1.0)  # random resized crop area range, as torchvision
    c.data.crop_ratio = (3 / 4, 4 / 3)
    c.data.hflip = True
    c.data.eval_crop_pct = 0.875  # eval: resize shorter side to size / pct, center crop
    c.data.eval_interpolation = "bilinear"  # of that resize, or "bicubic" (timm's default)
    # grain decode processes per host; 0 decodes in-process (on threads); -1 sizes them to
    # the host: its CPUs less 2, at most 16 per local device (pipeline.decode_workers)
    c.data.num_workers = -1
    # JPEGs decoded at 1/2, 1/4 or 1/8 scale (DCT scaling) when the crop still covers the
    # output size: 3x+ cheaper for camera-sized photos; changes pixels, so it is a result key
    c.data.reduced_decode = True
    c.data.read_threads = 16  # host batches read and decoded at once per decode process
    c.data.fetch_threads = 32  # a host batch's ImageFolder files fetched at once per process
    # "global": a permutation of the split per epoch, one read per image. "blocks": runs of
    # shuffle_block consecutive records, shuffled within windows of shuffle_window runs, so
    # a packed dataset in a bucket is read a run per request (vitpod/data/order.py); an
    # ImageFolder gives the same batches either way.
    c.data.shuffle = "global"
    c.data.shuffle_block = 32  # the packed format's run length (data/packed.py's RUN)
    c.data.shuffle_window = 1024
    c.data.eval_batch_size = 0  # global; 0 means batch_size
    c.data.max_skipped_fraction = 0.01  # unreadable images tolerated before stopping
    # Images with more pixels are skipped like corrupt ones, checked from the header before
    # decoding: a 250 KB PNG can declare 16000x16000 pixels and take 1 GB+ to decode (a
    # decompression bomb). Pillow's default limit; 0: no limit.
    c.data.max_image_pixels = 89_478_485
    # RandAugment after crop and flip (0 ops: off); magnitude 0..10, as big_vision and timm.
    c.data.randaug_num_ops = 0
    c.data.randaug_magnitude = 10

    c.model = ml_collections.ConfigDict()
    c.model.variant = "B/16"  # NAME/PATCH or any shape: "w768-d12-h12-m3072/16" (model.py)
    c.model.init_from = ""
    c.model.pool = "cls"  # "cls" token or "gap" (global average pooling)
    c.model.layer_norm_eps = 1e-6
    # MLP activation: "exact" (erf) GELU, HF's "gelu", or "tanh", the approximation flax,
    # big_vision and the original ViT use. model.init_from sets it from the checkpoint.
    c.model.gelu = "exact"
    c.model.dtype = "float32"  # matmul/activation dtype; params stay float32
    c.model.posemb = "learn"  # learned position embeddings, or "sincos2d" (fixed)
    c.model.dropout = 0.0  # on the embeddings and each attention/MLP output
    c.model.drop_path = 0.0  # stochastic depth of the last block; 0 at the first, linear between
    # The blocks as one lax.scan (compile time independent of depth; with mesh.fsdp > 1 only
    # one layer's weights are gathered at a time). Unset: scan with FSDP or remat, else
    # unrolled (faster: no per-layer residual stacks). And what each block's backward pass
    # recomputes: "none" (keep activations), "dots" (keep matmul outputs), "full" (keep only
    # the input).
    c.model.scan_layers = ml_collections.config_dict.placeholder(bool)
    c.model.remat = "none"
    # "auto": on TPU the attention runs as one fused kernel per image where it fits VMEM
    # (fused_attention.py), else XLA's. "xla": XLA's attention on every backend.
    c.model.attention = "auto"

    # Mixup / CutMix of the device batch inside the step (timm's semantics): each step draws
    # one ratio from Beta(alpha, alpha) and mixes each pair of neighbouring rows; with both
    # alphas set, a step uses CutMix with probability cutmix_prob. 0 turns each off.
    c.mix = ml_collections.ConfigDict()
    c.mix.mixup_alpha = 0.0
    c.mix.cutmix_alpha = 0.0
    c.mix.cutmix_prob = 0.5
    c.label_smoothing = 0.0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.0  # cosine decays to lr * min_lr_ratio
    c.optim.weight_decay = 1e-4  # optax (decoupled, multiplied by lr) on kernels only
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.clip_norm = 1.0  # 0 disables global-norm clipping
    c.optim.schedule = "cosine"  # after warmup: "cosine", "linear" or "constant"
    c.optim.cooldown_steps = 0  # "constant": linear decay to min over the last N steps
    # Layer-wise lr decay for fine-tuning: block i of L gets lr * layer_decay**(L - i), the
    # embeddings layer_decay**(L + 1), the final norm and head lr. 1.0: off.
    c.optim.layer_decay = 1.0
    c.optim.freeze = ""  # regex on param names (e.g. "^blocks\.[0-5]\."): never updated
    c.optim.ema_decay = 0.0  # keep an EMA of params (e.g. 0.9999), used for eval and export

    # data and fsdp lay out one slice (over ICI); with several slices (multislice, over
    # DCN) the mesh's data axis is dcn_data x data, so only the gradient sum crosses slices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices of a slice not used by the other axes
    c.mesh.fsdp = 1  # -1 (with data=-1): FSDP over all devices of a slice, whatever the slice
    c.mesh.dcn_data = -1  # -1: the number of slices (1 on one slice); set, it must equal it
    return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Lock a config so that a mistyped key is an error, not a silent new key."""
    config.lock()
    return config


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int,
             num_slices: int = 1) -> None:
    """Raise UserError naming the key and the fix for any invalid value."""
    d = config.data
    _require(config.batch_size > 0, "batch_size", "must be positive")
    _require(config.total_steps > 0, "total_steps", "must be positive")
    _require(config.log_every >= 1, "log_every", "must be >= 1 (steps between log rows)")
    _require(config.save_every >= 1, "save_every", "must be >= 1 (steps between checkpoints)")
    _require(config.eval_every >= 0, "eval_every", "must be >= 0 (0: only at the end)")
    _require(config.save_every_minutes >= 0, "save_every_minutes", "must be >= 0 (0: off)")
    _require(config.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1 (the newest "
             "checkpoint is always kept: 1 keeps only it)")
    _require(bool(d.train_dir), "data.train_dir", "is empty; pass --config.data.train_dir=DIR")
    _require(d.image_size > 0, "data.image_size", "must be positive")
    _require(len(d.mean) == 3 and len(d.std) == 3, "data.mean/std", "need 3 values (RGB)")
    _require(min(d.std) > 0, "data.std", "must be positive")
    _require(0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale", "needs 0<lo<=hi<=1")
    _require(0 < d.crop_ratio[0] <= d.crop_ratio[1], "data.crop_ratio", "needs 0<lo<=hi")
    _require(d.eval_batch_size >= 0, "data.eval_batch_size", "must be >= 0 (0: batch_size)")
    _require(0 <= d.max_skipped_fraction <= 1, "data.max_skipped_fraction", "must be in [0, 1]")
    _require(0 < d.eval_crop_pct <= 1, "data.eval_crop_pct", "must be in (0, 1]")
    _require(d.eval_interpolation in ("bilinear", "bicubic"), "data.eval_interpolation",
             "must be 'bilinear' or 'bicubic'")
    _require(d.num_workers >= -1, "data.num_workers", "must be >= 0, or -1 (sized to the host)")
    _require(d.read_threads >= 1, "data.read_threads", "must be >= 1")
    _require(d.fetch_threads >= 1, "data.fetch_threads", "must be >= 1")
    _require(d.max_image_pixels >= 0, "data.max_image_pixels", "must be >= 0 (0: no limit)")
    _require(config.lease_timeout_minutes > 0, "lease_timeout_minutes", "must be positive")
    _require(d.shuffle in ("global", "blocks"), "data.shuffle", "must be 'global' or 'blocks'")
    _require(d.shuffle_block >= 1, "data.shuffle_block", "must be >= 1 (records per run)")
    _require(d.shuffle_window >= 1, "data.shuffle_window", "must be >= 1 (runs per window)")
    _require(config.model.pool in ("cls", "gap"), "model.pool", "must be 'cls' or 'gap'")
    _require(config.model.dtype in ("float32", "bfloat16"), "model.dtype",
             "must be 'float32' or 'bfloat16'")
    _require(config.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(config.optim.lr > 0, "optim.lr", "must be positive")
    o, m = config.optim, config.model
    _require(o.schedule in ("cosine", "linear", "constant"), "optim.schedule",
             "must be 'cosine', 'linear' or 'constant'")
    _require(o.cooldown_steps >= 0, "optim.cooldown_steps", "must be >= 0")
    both = o.warmup_steps + o.cooldown_steps
    _require(both <= config.total_steps,
             "optim.warmup_steps" + (" + optim.cooldown_steps" if o.cooldown_steps else ""),
             f"= {both} is more than total_steps={config.total_steps}; lower it or raise "
             "total_steps")
    _require(0 < o.layer_decay <= 1, "optim.layer_decay", "must be in (0, 1] (1: off)")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1/b2", "must be in [0, 1)")
    _require(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0: off)")
    _require(m.layer_norm_eps > 0, "model.layer_norm_eps", "must be positive")
    _require(0 <= o.ema_decay < 1, "optim.ema_decay", "must be in [0, 1) (0: off)")
    _require(m.posemb in ("learn", "sincos2d"), "model.posemb", "must be 'learn' or 'sincos2d'")
    _require(m.gelu in ("exact", "tanh"), "model.gelu", "must be 'exact' or 'tanh'")
    _require(m.remat in ("none", "dots", "full"), "model.remat", "must be 'none', 'dots' or 'full'")
    _require(m.attention in ("auto", "xla"), "model.attention", f"is {m.attention!r}: use 'auto' "
             "(on TPU the fused kernel where it fits) or 'xla'")
    _require(0 <= m.dropout < 1, "model.dropout", "must be in [0, 1)")
    _require(0 <= m.drop_path < 1, "model.drop_path", "must be in [0, 1)")
    _require(0 <= d.randaug_num_ops <= 10, "data.randaug_num_ops", "must be in 0..10")
    _require(0 <= d.randaug_magnitude <= 10, "data.randaug_magnitude", "must be in 0..10")
    x = config.mix
    _require(x.mixup_alpha >= 0 and x.cutmix_alpha >= 0, "mix.mixup_alpha/cutmix_alpha",
             "must be >= 0 (0: off)")
    _require(0 <= x.cutmix_prob <= 1, "mix.cutmix_prob", "must be in [0, 1]")
    _require(0 <= config.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")

    data, fsdp = mesh_shape(config.mesh, num_devices, num_slices)
    for key in ("batch_size", "data.eval_batch_size"):
        value = eval_batch_size(config) if key == "data.eval_batch_size" else config.batch_size
        if value % (data * fsdp) or value % num_processes:
            raise UserError(
                f"config {key}={value} is not divisible by the {data * fsdp} devices "
                f"of the mesh" + (f" and the {num_processes} processes" if num_processes > 1
                                  else "") + f"; use a multiple of "
                f"{_lcm(data * fsdp, num_processes)}")
    _require(config.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
    per_device = config.batch_size // (data * fsdp)
    if per_device % config.grad_accum_steps:
        raise UserError(f"config grad_accum_steps={config.grad_accum_steps} does not divide the "
                        f"{per_device} rows each of the {data * fsdp} devices gets from "
                        f"batch_size={config.batch_size}; pick a divisor of {per_device}")
    if (x.mixup_alpha or x.cutmix_alpha) and (per_device // config.grad_accum_steps) % 2:
        raise UserError(f"config mix.* pairs neighbouring rows, but each device's microbatch "
                        f"has {per_device // config.grad_accum_steps} (odd) rows; make "
                        "batch_size / (devices x grad_accum_steps) even")


def mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int,
               num_slices: int = 1) -> tuple[int, int]:
    """(data, fsdp) sizes of the whole mesh: data counts every slice (dcn_data x data)."""
    (dcn_data, _), (data, fsdp) = hybrid_mesh_shapes(mesh, num_devices, num_slices)
    return dcn_data * data, fsdp


def hybrid_mesh_shapes(mesh: ml_collections.ConfigDict, num_devices: int, num_slices: int = 1
                       ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((dcn_data, 1), (data, fsdp)): how the slices are laid out (over DCN), and one slice
    (over ICI), with -1 resolved to the remaining devices of a slice; `fsdp=-1` with `data=-1`
    (its default) means FSDP over all devices of a slice, so a config adapts to any slice."""
    dcn_data = num_slices if mesh.dcn_data == -1 else mesh.dcn_data
    if dcn_data != num_slices or num_devices % num_slices:
        raise UserError(f"config mesh.dcn_data={mesh.dcn_data} does not match the {num_slices} "
                        f"slice(s) of {num_devices} devices; set it to -1 (the number of slices)")
    per_slice = num_devices // num_slices
    data, fsdp = mesh.data, mesh.fsdp
    if fsdp == -1 and data == -1:
        data = 1
    if fsdp == -1:
        fsdp = per_slice // data if data > 0 and per_slice % data == 0 else 0
    if data == -1:
        data = per_slice // fsdp if fsdp > 0 and per_slice % fsdp == 0 else 0
    if data <= 0 or fsdp <= 0 or data * fsdp != per_slice:
        where = f"{per_slice} devices of each of the {num_slices} slices" if num_slices > 1 \
            else f"{per_slice} devices"
        raise UserError(
            f"config mesh.data={mesh.data} x mesh.fsdp={mesh.fsdp} does not match the "
            f"{where}; make their product {per_slice} (or set one to -1)")
    return (dcn_data, 1), (data, fsdp)


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
    return config.data.eval_batch_size or config.batch_size


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise UserError(f"config {key} {what}")


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)

