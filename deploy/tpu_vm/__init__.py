"""The TPU-VM door: Cloud TPU slices as queued resources, set up and launched over ssh
(`python3 -m deploy.tpu_vm VERB`, the `make pod-*` targets). Imports deploy's core, never
deploy/gke."""
