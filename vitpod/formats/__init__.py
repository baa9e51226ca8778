"""Checkpoint formats in and out: Hugging Face ViT, timm, big_vision .npz, and the
common form they share."""
