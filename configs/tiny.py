"""Tiny: the smallest real run, for tests and for debugging the loop in seconds.

    python -m vitpod.train --config=configs/tiny.py --workdir=/tmp/tiny \
        --config.data.train_dir=DIR/train --config.data.val_dir=DIR/val

Expected: finishes in seconds on CPU; the loss falls, accuracy is not the point.
"""

from vitpod.config import defaults, finalize


def get_config(arg=None):
    c = defaults()
    c.batch_size = 16
    c.total_steps = 6
    c.log_every = 1
    c.eval_every = 0
    c.save_every = 3
    c.keep_checkpoints = 3
    c.data.image_size = 8
    c.data.crop_scale = (0.5, 1.0)
    c.data.hflip = False
    c.data.eval_crop_pct = 1.0
    c.data.num_workers = 0
    c.model.variant = "pico/4"
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 2
    return finalize(c)
