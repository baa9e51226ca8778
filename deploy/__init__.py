"""Running vitpod on Cloud TPU: a shared job core (shell, bucket, settings, tpu_types, job) and
two doors beside it, TPU VMs (`python3 -m deploy.tpu_vm VERB`) and GKE (`python3 -m
deploy.gke VERB`), from the repository root.

Standard library only, with vitpod.protocol and vitpod.errors: it runs under a plain
python3 without vitpod's dependencies. deploy/sim rehearses both doors on localhost.
"""
