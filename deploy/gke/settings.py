"""The GKE door's settings on top of the run's: the container image, more flags for its
build, the cluster, the JobSet's namespace, and how long a pod may take to save after its
SIGTERM."""

import dataclasses

from deploy.settings import RunSettings


@dataclasses.dataclass(frozen=True, kw_only=True)
class GkeSettings(RunSettings):
    image: str = ""
    image_build_flags: str = ""
    cluster: str = ""
    namespace: str = "default"
    grace_seconds: int = 300
