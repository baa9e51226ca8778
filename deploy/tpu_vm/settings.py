"""The TPU-VM door's settings on top of the run's: where its queued resources go, how long
to wait and retry, and how its workers are reached."""

import dataclasses

from deploy.settings import RunSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuVmSettings(RunSettings):
    asks_runtime = True

    project: str
    zone: str
    queue_timeout: float
    wait_timeout: float
    ssh_timeout: float
    ssh_retries: int
    describe_retries: int
    log_sync_seconds: float
    crash_grace: float
    free_tpu: bool
