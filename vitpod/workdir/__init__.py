"""A run's workdir: its recorded config and manifest, the launch protocol, goodput records.

Standard library only at import time: deploy/ imports vitpod.workdir.protocol.
"""
