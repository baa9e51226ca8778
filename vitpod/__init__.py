"""vitpod: train and fine-tune Vision Transformers on Cloud TPU pods with JAX."""
