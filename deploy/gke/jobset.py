"""One run as a JobSet (jobset.x-k8s.io/v1alpha2): a Job per slice, a pod per TPU VM, each
pod running the same `vitpod.train` line `pod-run` launches, in the image `make image` built.

The shape is the one xpk and JobSet's own TPU example use (docs/gke.md names them): exclusive
placement of each Job on one node pool, `backoffLimit: 0` (a pod that fails fails its slice's
Job), `restartPolicy: Never`, host network, a privileged container with the VM's chips. Nothing
in the pod is vitpod-specific: GKE gives each pod TPU_WORKER_ID, TPU_WORKER_HOSTNAMES and, with
several slices, the MEGASCALE_* values (who sets those is unverified: docs/gke.md), which JAX
reads itself.

Shared memory: a container's /dev/shm is 64 MB, and grain's decode processes hand every host
batch to the trainer through it (vitpod/data/shared_memory.py), so the pod mounts a
memory-backed emptyDir there, as xpk does (src/xpk/core/docker_resources.py, get_volumes).

Failures: a failed Job restarts the whole JobSet up to MAX_RETRIES times, unless a pod exited
with a code outside RESTARTABLE (xpk's: 42 and 127-255, signals and runtime aborts): then the
JobSet fails at once (a config error, exit 2, would fail again). A trainer stopped by a SIGTERM
saves and exits PREEMPTED_EXIT_CODE, so that a run cut short is restarted, never complete.
"""

import os
import re

from deploy.gke.settings import GkeSettings
from deploy.job import slice_label, train_command
from deploy.settings import DEPLOY_DIR, slice_devices
from deploy.shell import DeployError
from deploy.tpu_types import ACCELERATOR_LABEL, TOPOLOGY_LABEL, TPU_RESOURCE, GkeTpu, gke_tpu
from vitpod import protocol

API_VERSION = "jobset.x-k8s.io/v1alpha2"
EXCLUSIVE_KEY = "alpha.jobset.sigs.k8s.io/exclusive-topology"
NODE_POOL_LABEL = "cloud.google.com/gke-nodepool"
REPLICATED_JOB = "slice"  # Jobs are NAME-slice-0, NAME-slice-1, ...; pods NAME-slice-J-P-xxxxx
CONTAINER = "vitpod"
SHM_VOLUME = "dshm"  # a memory-backed emptyDir at /dev/shm
PREEMPTED_EXIT_CODE = 42
# What a spot or preemptible node gives its pods after its notice: about 15 s, best effort; a
# longer terminationGracePeriodSeconds has no effect there (GKE, "Use preemptible VMs",
# https://cloud.google.com/kubernetes-engine/docs/how-to/preemptible-vms, and "Spot VMs",
# https://cloud.google.com/kubernetes-engine/docs/concepts/spot-vms).
SPOT_NOTICE_SECONDS = 15
RESTARTABLE = (PREEMPTED_EXIT_CODE, *range(127, 256))
# In the image (deploy/gke/Dockerfile): the home worker.sh set up, as on a TPU VM.
IMAGE_HOME = "/opt/vitpod"
IMAGE_PYTHON = f"{IMAGE_HOME}/{protocol.VENV}/bin/python"
CONFIGS_DIR = "configs"  # the checkout's, copied into the image as IMAGE_HOME/vitpod-configs
_ROOT = os.path.dirname(DEPLOY_DIR)
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def image_config(config: str) -> str:
    """Where CONFIG (configs/X.py[:arg], relative to the checkout) lies in the image."""
    path, sep, arg = config.partition(":")
    relative = os.path.relpath(os.path.abspath(os.path.join(_ROOT, path)),
                               os.path.join(_ROOT, CONFIGS_DIR))
    if relative.startswith(os.pardir) or not os.path.isfile(os.path.join(_ROOT, path)):
        raise DeployError(f"CONFIG={config!r}: the image carries the checkout's {CONFIGS_DIR}/ "
                          f"only (make image copies it): put the config file there and rebuild")
    return f"{IMAGE_HOME}/{protocol.CONFIGS}/{relative.replace(os.sep, '/')}{sep}{arg}"


def check_names(s: GkeSettings, tpu: GkeTpu, slices: int) -> None:
    """NAME and NAMESPACE as Kubernetes takes them: the longest pod name JobSet makes from
    NAME must be a DNS-1035 label (JobSet's webhook refuses the JobSet otherwise)."""
    if not _DNS_1123.fullmatch(s.namespace) or len(s.namespace) > 63:
        raise DeployError(f"NAMESPACE={s.namespace!r}: a Kubernetes namespace is lowercase "
                          "letters, digits and '-', at most 63 characters")
    pod = f"{s.name}-{REPLICATED_JOB}-{slices - 1}-{tpu.vms_per_slice - 1}-abcde"
    if not _DNS_1035.fullmatch(pod) or len(pod) > 63:
        raise DeployError(f"NAME={s.name!r}: the JobSet's pod names ({pod}) must be lowercase "
                          "letters, digits and '-', start with a letter, at most 63 characters")


def build(s: GkeSettings) -> dict:
    """The JobSet for the first of TPU_TYPES and the first of NUM_SLICES; DeployError on a
    setting it cannot be made from."""
    s.require("NAME", "TPU_TYPE", "WORKDIR", "CONFIG", "IMAGE")
    tpu, slices = gke_tpu(s.tpu_type), s.num_slices
    if slices > 1 and tpu.vms_per_slice == 1:
        raise DeployError(f"NUM_SLICES={slices} with {tpu.name}: GKE runs Multislice on multi-host "
                          f"TPU node pools only, and a {tpu.name} is one VM; use a larger type or "
                          "one slice")
    check_names(s, tpu, slices)
    devices = slice_devices(tpu.name)
    if devices != tpu.chips:  # one JAX device per chip on every GKE type (megacore on v4/v5p)
        raise DeployError(f"TPU_TYPE={tpu.name!r}: {devices} JAX devices but {tpu.chips} chips on "
                          "GKE; vitpod cannot tell how JAX will see it")
    command = train_command(s, IMAGE_PYTHON, image_config(s.config), devices * slices,
                            f"--exit_code_if_preempted={PREEMPTED_EXIT_CODE}")
    env = {protocol.PLATFORMS_ENV: s.platform,
           protocol.COORDINATOR_PORT_ENV: str(s.coordinator_port),
           protocol.INIT_TIMEOUT_ENV: f"{s.init_timeout:g}",
           protocol.SLICE_ENV: slice_label(tpu.name, slices)}
    container = {
        "name": CONTAINER, "image": s.image, "command": command,
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "securityContext": {"privileged": True},
        "resources": {"limits": {TPU_RESOURCE: tpu.chips_per_vm}},
        "volumeMounts": [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}],
    }
    pod_spec = {
        "restartPolicy": "Never",
        "nodeSelector": {ACCELERATOR_LABEL: tpu.accelerator, TOPOLOGY_LABEL: tpu.topology},
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "terminationGracePeriodSeconds": s.grace_seconds,
        "tolerations": [{"key": TPU_RESOURCE, "operator": "Exists"}],  # any effect
        "containers": [container],
        "volumes": [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}],
    }
    job_spec = {
        "parallelism": tpu.vms_per_slice,
        "completions": tpu.vms_per_slice,
        "backoffLimit": 0,
        "podFailurePolicy": {"rules": [{
            "action": "FailJob",
            "onPodConditions": [],  # required by Kubernetes before 1.30
            "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn",
                            "values": list(RESTARTABLE)}}]},
        "template": {"spec": pod_spec},
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "JobSet",
        "metadata": {"name": s.name, "namespace": s.namespace,
                     "annotations": {EXCLUSIVE_KEY: NODE_POOL_LABEL}},
        "spec": {
            "failurePolicy": {
                "maxRestarts": s.max_retries,
                "rules": [{"name": "failOnNonRestartableExit", "action": "FailJobSet",
                           "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": slices,
                                "template": {"spec": job_spec}}],
        },
    }
