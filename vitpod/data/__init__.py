"""ImageFolder data: scan into a manifest, decode and transform, step-indexed grain batches."""
