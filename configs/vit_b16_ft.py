"""Fine-tune ViT-B/16 pretrained on ImageNet-21k (Hugging Face checkpoint) on an ImageFolder.

    python -m vitpod.train --config=configs/vit_b16_ft.py --workdir=gs://BUCKET/runs/b16-cifar10 \
        --config.data.train_dir=gs://BUCKET/cifar10/train \
        --config.data.val_dir=gs://BUCKET/cifar10/test

`model.init_from` is a hub id (downloaded when online), a Hugging Face ViT or timm
`save_for_hf` directory, or a big_vision / vision_transformer .npz (local or gs://). The
checkpoint fixes the architecture (model.variant, model.gelu, model.layer_norm_eps); a value
here that differs is replaced, with one warning line naming it.

Hardware: sized for a TPU v4-8 (4 chips, batch 512 at 224 px, about 20 min for 10k steps
at ~1k img/s per chip); on fewer chips lower batch_size and raise total_steps.
Expected: CIFAR-10 top-1 about 98.5-99 % (Dosovitskiy et al. 2021, table 2: ViT-B/16 from
ImageNet-21k reaches 98.1-99.0 % on CIFAR-10 depending on resolution and schedule).
"""

from vitpod.config import defaults, finalize


def get_config(arg=None):
    c = defaults()
    c.seed = 0
    c.batch_size = 512
    c.total_steps = 10_000
    c.log_every = 100
    c.eval_every = 1000
    c.save_every = 1000
    c.save_every_minutes = 15.0
    c.data.image_size = 224
    c.data.mean = (0.5, 0.5, 0.5)  # what google/vit-base-patch16-224-in21k was trained with
    c.data.std = (0.5, 0.5, 0.5)
    c.data.crop_scale = (0.08, 1.0)
    c.data.hflip = True
    c.model.variant = "B/16"
    c.model.init_from = "google/vit-base-patch16-224-in21k"
    c.model.pool = "cls"
    c.model.layer_norm_eps = 1e-12  # HF ViT's
    c.optim.lr = 1e-4  # AdamW fine-tuning at batch 512 (big_vision uses SGD-momentum at 0.03)
    c.optim.warmup_steps = 500
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    return finalize(c)
