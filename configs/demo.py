"""Demo: a small ViT on scikit-learn's real digits, 8 fake CPU devices.

    make demo
    # = python -m vitpod.prepare digits --out=data/digits
    #   XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    #   python -m vitpod.train --config=configs/demo.py --workdir=runs/demo

Hardware: a 2-core CPU laptop or CI machine; the mesh is data=8 over fake devices.
Expected: final validation accuracy about 0.98 (>= 0.95) on the 360 held-out digits.
"""

from vitpod.config import defaults, finalize


def get_config(arg=None):
    c = defaults()
    c.seed = 0
    c.batch_size = 128
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = 250
    c.save_every = 250
    c.data.train_dir = "data/digits/train"
    c.data.val_dir = "data/digits/val"
    c.data.image_size = 16  # the 8x8 digits upscaled 2x: 16 tokens of 4x4 px
    c.data.crop_scale = (0.6, 1.0)
    c.data.crop_ratio = (0.8, 1.25)
    c.data.hflip = False  # mirrored digits are other digits
    c.data.eval_crop_pct = 1.0
    c.data.num_workers = 0
    c.model.variant = "mu/4"
    c.model.pool = "cls"  # the class token, as HF ViT: the demo exports to transformers
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 1e-4
    return finalize(c)
