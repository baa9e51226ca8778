"""python3 -m deploy.tpu_vm {create|setup|check|launch|watch|status|logs|ssh|delete|run}: the
`make pod-*` targets (deploy/tpu_vm/pod.py)."""

import sys

from deploy import job
from deploy.tpu_vm.pod import VERBS
from deploy.tpu_vm.settings import TpuVmSettings

if __name__ == "__main__":
    sys.exit(job.main("deploy.tpu_vm", VERBS, TpuVmSettings, sys.argv))
