"""Running vitpod on Cloud TPU slices (`python3 -m deploy.pod VERB` from the repository root).

Standard library only, with vitpod.workdir.protocol and vitpod.errors: it runs under a plain
python3 without vitpod's dependencies. deploy/sim rehearses it on localhost.
"""
