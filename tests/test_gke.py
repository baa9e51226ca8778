"""GKE: the JobSet `make gke-manifest` writes, against the JobSet API's own types and
Kubernetes' schemas; the image `make image` builds, rehearsed without a daemon; the trainer's
side (joining the job on a GKE pod, the exit code of a preempted run)."""

import math
import os
import re
import shlex
import signal
import subprocess
import sys
import zipfile

import jax
import pytest
import yaml

from deploy import tpu_types as tpus
from deploy.gke import image, jobset, yamltext
from deploy.gke.__main__ import main as gke_main
from deploy.gke.schema import JOBSET, schema_errors
from deploy.gke.settings import GkeSettings
from deploy.settings import load_settings, slice_devices
from deploy.shell import DeployError
from deploy.sim.jobset_controller import container_code
from tests.conftest import ROOT
from vitpod import distributed, protocol

BASE = {"NAME": "vit-run", "TPU_TYPE": "v5litepod-16", "WORKDIR": "gs://bkt/runs/a",
        "CONFIG": "configs/demo.py", "IMAGE": "us-docker.pkg.dev/proj/repo/vitpod:v1"}


def settings(**overrides):
    return load_settings(os.devnull, {**BASE, **overrides}, GkeSettings)


# --- The JobSet API (jobset.x-k8s.io/v1alpha2): deploy/gke/schema.py -----------------------

def test_the_schema_catches_a_misspelt_field_a_missing_one_and_a_bad_enum():
    doc = jobset.build(settings())
    assert schema_errors(doc, JOBSET) == []
    doc["spec"]["failurePolicy"]["maxRestart"] = 3
    del doc["spec"]["replicatedJobs"][0]["template"]
    doc["spec"]["failurePolicy"]["rules"][0]["action"] = "FailJob"
    assert len(schema_errors(doc, JOBSET)) == 3


# --- Values per TPU type, read from xpk's system_characteristics.py -------------------------
# type: (accelerator label, topology, VMs per slice, chips per VM, machine type)
EXPECTED = {
    "v4-8": ("tpu-v4-podslice", "2x2x1", 1, 4, "ct4p-hightpu-4t"),
    "v4-16": ("tpu-v4-podslice", "2x2x2", 2, 4, "ct4p-hightpu-4t"),
    "v4-32": ("tpu-v4-podslice", "2x2x4", 4, 4, "ct4p-hightpu-4t"),
    "v4-128": ("tpu-v4-podslice", "4x4x4", 16, 4, "ct4p-hightpu-4t"),
    "v5litepod-8": ("tpu-v5-lite-podslice", "2x4", 2, 4, "ct5lp-hightpu-4t"),
    "v5litepod-16": ("tpu-v5-lite-podslice", "4x4", 4, 4, "ct5lp-hightpu-4t"),
    "v5litepod-256": ("tpu-v5-lite-podslice", "16x16", 64, 4, "ct5lp-hightpu-4t"),
    "v5p-8": ("tpu-v5p-slice", "2x2x1", 1, 4, "ct5p-hightpu-4t"),
    "v5p-32": ("tpu-v5p-slice", "2x2x4", 4, 4, "ct5p-hightpu-4t"),
    "v5p-384": ("tpu-v5p-slice", "4x4x12", 48, 4, "ct5p-hightpu-4t"),
    "v6e-1": ("tpu-v6e-slice", "1x1", 1, 1, "ct6e-standard-1t"),
    "v6e-4": ("tpu-v6e-slice", "2x2", 1, 4, "ct6e-standard-4t"),
    "v6e-8": ("tpu-v6e-slice", "2x4", 2, 4, "ct6e-standard-4t"),
    "v6e-16": ("tpu-v6e-slice", "4x4", 4, 4, "ct6e-standard-4t"),
}

ACCELERATORS = {"v4": "tpu-v4-podslice", "v5litepod": "tpu-v5-lite-podslice",
                "v5p": "tpu-v5p-slice", "v6e": "tpu-v6e-slice"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tpu_types_have_xpks_gke_values(name):
    t = tpus.gke_tpu(name)
    assert (t.accelerator, t.topology, t.vms_per_slice, t.chips_per_vm,
            t.machine_type) == EXPECTED[name]


def _pod_spec(doc):
    return doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("slices", [1, 2])
def test_every_type_makes_a_jobset_of_its_shape(slices):
    for name, t in tpus.known_types().items():
        if slices > 1 and t.vms_per_slice == 1:  # GKE's Multislice takes multi-host pools only
            with pytest.raises(DeployError, match="Multislice on multi-host TPU node pools only"):
                jobset.build(settings(TPU_TYPE=name, NUM_SLICES=str(slices)))
            continue
        doc = jobset.build(settings(TPU_TYPE=name, NUM_SLICES=str(slices)))
        assert schema_errors(doc, JOBSET) == [], name
        assert yaml.safe_load(yamltext.dump(doc)) == doc, name
        (rjob,) = doc["spec"]["replicatedJobs"]
        job, pod = rjob["template"]["spec"], _pod_spec(doc)
        (container,) = pod["containers"]
        chips = math.prod(int(n) for n in t.topology.split("x"))
        assert rjob["replicas"] == slices
        assert job["parallelism"] == job["completions"] == t.vms_per_slice == chips // (
            1 if chips == 1 else 4), name
        assert container["resources"]["limits"]["google.com/tpu"] == t.chips_per_vm
        assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": t.accelerator,
                                       "cloud.google.com/gke-tpu-topology": t.topology}
        assert t.accelerator == ACCELERATORS[name.rsplit("-", 1)[0]]
        devices = slice_devices(name)
        assert devices == chips == t.vms_per_slice * t.chips_per_vm, name
        assert f"--expect_devices={devices * slices}" in container["command"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["VITPOD_TPU_TYPE"] == (name if slices == 1 else f"{slices}x{name}")


def test_the_pod_runs_pod_runs_train_line_with_the_baked_config():
    doc = jobset.build(settings(TPU_TYPE="v4-32", NUM_SLICES="2,1", CONFIG="configs/tiny.py:x",
                                TRAIN_FLAGS="--config.note='a b; rm -rf /' --stop_after=5",
                                COORDINATOR_PORT="8476", INIT_TIMEOUT="900", MAX_RETRIES="7",
                                GRACE_SECONDS="120", NAMESPACE="ml"))
    pod = _pod_spec(doc)
    (container,) = pod["containers"]
    assert container["command"] == [
        "/opt/vitpod/vitpod-venv/bin/python", "-m", "vitpod.train",
        "--config=/opt/vitpod/vitpod-configs/tiny.py:x", "--workdir=gs://bkt/runs/a",
        "--expect_platform=tpu", "--expect_devices=32", "--exit_code_if_preempted=42",
        "--config.note=a b; rm -rf /", "--stop_after=5"]
    assert container["image"] == BASE["IMAGE"] and container["securityContext"] == {
        "privileged": True}
    # No MEGASCALE_* or TPU_WORKER_*: GKE gives every pod those.
    assert {e["name"]: e["value"] for e in container["env"]} == {
        "JAX_PLATFORMS": "tpu", "JAX_COORDINATOR_PORT": "8476", "VITPOD_INIT_TIMEOUT": "900",
        "VITPOD_TPU_TYPE": "2xv4-32"}
    assert doc["metadata"] == {"name": "vit-run", "namespace": "ml", "annotations": {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}}
    assert (pod["hostNetwork"], pod["dnsPolicy"], pod["restartPolicy"],
            pod["terminationGracePeriodSeconds"]) == (True, "ClusterFirstWithHostNet", "Never",
                                                     120)
    assert pod["tolerations"] == [{"key": "google.com/tpu", "operator": "Exists"}]
    policy = doc["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 7
    assert policy["rules"][0]["action"] == "FailJobSet"
    (rule,) = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["operator"] == "NotIn"
    assert rule["onExitCodes"]["values"] == [42, *range(127, 256)]
    assert rule["onExitCodes"]["containerName"] == container["name"]


@pytest.mark.parametrize("version", ["1.28.0", "1.33.0", "1.37.0"])
def test_job_and_pod_templates_are_valid_kubernetes(version):
    kv = pytest.importorskip("kubernetes_validate", reason="make install (the test extra)")
    for name in ("v4-8", "v5litepod-16", "v5p-128", "v6e-1", "v6e-256"):
        for slices in (1, 2) if tpus.gke_tpu(name).vms_per_slice > 1 else (1,):
            rjob = jobset.build(settings(TPU_TYPE=name, NUM_SLICES=str(slices)))[
                "spec"]["replicatedJobs"][0]
            meta = {"name": "vit-run-slice-0"}
            kv.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
                         "spec": rjob["template"]["spec"]}, version, strict=True)
            kv.validate({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                         "spec": rjob["template"]["spec"]["template"]["spec"]}, version,
                        strict=True)
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
           "spec": {**rjob["template"]["spec"]["template"]["spec"], "hostNetwrk": True}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


def test_yaml_text_reads_back_as_written():
    doc = {"a": ["on", "no", "1", "1.5", "-x", "#c", "a: b", "x:", "é", "", "l\nm", " s", "~"],
           "b": {"c": [{"d": 1, "e": [1, 2]}, {}], "f": [], "g": True, "h": "gs://b/x"},
           "null": None}
    assert yaml.safe_load(yamltext.dump(doc)) == doc


# --- The one-line errors, before anything is printed ---------------------------------------
def _manifest(capsys, monkeypatch, **env):
    for key, value in {**BASE, "POD_ENV": os.devnull, **env}.items():
        monkeypatch.setenv(key, value)
    code = gke_main(["deploy.gke", "manifest"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("env, message", [
    ({"TPU_TYPE": "v9-8"}, "TPU_TYPE='v9-8': not a TPU type vitpod knows on GKE"),
    ({"TPU_TYPE": "v5litepod-4"}, "no GKE slice of that size; use one of v5litepod-8, "),
    ({"TPU_TYPE": "tpu7x-128"}, "not supported on GKE by vitpod yet: TPU7x node pools"),
    ({"TPU_TYPE": "v4-8", "NUM_SLICES": "2"}, "NUM_SLICES=2 with v4-8: GKE runs Multislice on "
                                              "multi-host TPU node pools only"),
    ({"IMAGE": ""}, "set IMAGE in deploy/pod.env or on the command line"),
    ({"WORKDIR": "/tmp/run"}, "WORKDIR='/tmp/run': use a gs:// path"),
    ({"CONFIG": "tests/faulty_train.py"}, "the image carries the checkout's configs/ only"),
    ({"CONFIG": "configs/nope.py"}, "the image carries the checkout's configs/ only"),
    ({"NAME": "Vit_Run"}, "the JobSet's pod names (Vit_Run-slice-0-3-abcde) must be"),
    ({"NAME": "v" * 50}, "at most 63 characters"),
    ({"NAMESPACE": "ML"}, "NAMESPACE='ML': a Kubernetes namespace is"),
    ({"GRACE_SECONDS": "-1"}, "GRACE_SECONDS='-1': use a number of seconds >= 0"),
    ({"TRAIN_FLAGS": "--config.batch_size=100"}, "preflight: the config does not fit "
                                                 "v5litepod-16 (16 devices)"),
])
def test_a_bad_setting_is_one_line_and_no_manifest(capsys, monkeypatch, env, message):
    code, out, err = _manifest(capsys, monkeypatch, **env)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and out == "" and len(errors) == 1, err
    assert message in errors[0]


def test_make_gke_manifest_prints_only_yaml(tmp_path):
    # As a user runs it at the top level: not as a sub-make of `make test`, which would print
    # "make[1]: Entering directory" on stdout.
    outer = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")
    env = {**{k: v for k, v in os.environ.items() if k not in outer}, **BASE,
           "POD_ENV": os.devnull, "TPU_TYPE": "v6e-16", "NUM_SLICES": "2",
           "TPU_TYPES": "v6e-16,v5litepod-16", "PYTHON": sys.executable}
    done = subprocess.run(["make", "gke-manifest"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout) == jobset.build(settings(
        TPU_TYPE="v6e-16", NUM_SLICES="2", TPU_TYPES="v6e-16,v5litepod-16"))
    assert all(line.startswith("[gke-manifest] ") for line in done.stderr.splitlines())
    assert "the first of TPU_TYPES" in done.stderr and "preflight: 2xv6e-16: ok" in done.stderr


# --- make image, without a daemon ------------------------------------------------------------
def _fake(folder, name, script):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/bin/bash\n" + script)
    (folder / name).chmod(0o755)


def _image(tmp_path, path, **env):
    return subprocess.run([sys.executable, "-m", "deploy.gke", "image"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **BASE, "POD_ENV": os.devnull, "PATH": str(path),
                               "WHEEL": str(tmp_path / "vitpod-0.1.0-py3-none-any.whl"), **env})


def test_make_image_says_in_one_line_that_docker_has_no_daemon(tmp_path):
    daemonless = ("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the "
                  "docker daemon running?")
    _fake(tmp_path / "bin", "docker", f'[ "$1" = info ] && {{ echo "{daemonless}" >&2; exit 1; }}\n'
                                      "echo built >> $0.log\n")
    done = _image(tmp_path, tmp_path / "bin")
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert done.stderr == (f"error: docker cannot build here (docker info: {daemonless}): run "
                           "make image where a docker daemon can be reached, or with podman\n")
    assert not (tmp_path / "bin" / "docker.log").exists()
    (tmp_path / "empty").mkdir()
    done = _image(tmp_path, tmp_path / "empty")
    assert done.stderr == ("error: make image needs docker (with a daemon it can reach) or "
                           "podman; neither is on PATH here\n")


def _dockerfile() -> tuple[list[str], dict[str, str], dict[str, str], str]:
    """The Dockerfile's ARG names without a default (make image passes them), the defaults of
    the others, its ENV values and its one RUN command."""
    text = (ROOT / "deploy" / "gke" / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip()
             and not line.startswith("#")]
    args = [line.split()[1] for line in lines[2:] if line.startswith("ARG ") and "=" not in line]
    defaults = dict(line.split()[1].split("=", 1) for line in lines[2:]
                    if line.startswith("ARG ") and "=" in line)
    env = dict(line.split()[1].split("=", 1) for line in lines if line.startswith("ENV "))
    (run,) = [line[4:] for line in lines if line.startswith("RUN ")]
    assert not any(line.startswith(("ENTRYPOINT", "CMD")) for line in lines)
    # The base is a build argument whose default is pinned.
    assert re.fullmatch(r"ARG BASE_IMAGE=python:\d+\.\d+\.\d+-slim-\w+", lines[0])
    assert lines[1] == "FROM ${BASE_IMAGE}"
    assert f"WORKDIR {jobset.IMAGE_HOME}" in lines
    return args, defaults, env, run


def test_make_image_builds_what_worker_sh_sets_up_at_the_manifests_paths(tmp_path):
    """A docker that answers `info` records the build; the Dockerfile's RUN then runs on the
    staged context with a stand-in uv, as the build would: the venv lands where the manifest
    runs it."""
    (tmp_path / "vitpod-0.1.0-py3-none-any.whl").write_text("wheel")
    record = tmp_path / "record"
    _fake(tmp_path / "bin", "docker", f'[ "$1" = info ] && exit 0\n'
          """[ "$1" = image ] && { echo '[{"Size": 1850000000}]'; exit 0; }\n"""
          f'printf "%s\\n" "$@" > {record}.args; cp -r "${{@: -1}}" {record}\n')
    done = _image(tmp_path, f"{tmp_path / 'bin'}:/usr/bin:/bin", PYTHON_VERSION="3.11.9")
    assert done.returncode == 0, done.stderr
    assert f"[image] built {BASE['IMAGE']} (1.85 GB) in " in done.stdout
    argv = (tmp_path / "record.args").read_text().splitlines()
    assert argv[:5] == ["build", "-f", image.DOCKERFILE, "-t", BASE["IMAGE"]]
    build_args = dict(a.removeprefix("--build-arg=").split("=", 1) for a in argv[5:-1]
                      if a.startswith("--build-arg="))
    args, defaults, env, run = _dockerfile()
    assert sorted(build_args) == sorted(args)
    # A user's build: only uv-managed interpreters, no download cache, PEP 668 respected.
    assert defaults == {"UV_PYTHON_PREFERENCE": "only-managed", "PIP_BREAK_SYSTEM_PACKAGES": "0",
                        "UV_NO_CACHE": "1", "UV_CACHE_DIR": f"{jobset.IMAGE_HOME}/.cache/uv"}
    (label,) = [a for a in argv if a.startswith("--label=")]
    assert re.fullmatch(rf"--label={image.SOURCE_LABEL}=[0-9a-f]{{64}}", label)
    assert build_args["PYTHON_VERSION"] == "3.11.9" and build_args["VENV"] == protocol.VENV
    assert env["HOME"] == jobset.IMAGE_HOME
    home = tmp_path / "record"  # the context, copied to the image's home (COPY . ./)
    assert sorted(os.listdir(home)) == sorted([
        "vitpod-0.1.0-py3-none-any.whl", protocol.CONSTRAINTS, protocol.WORKER_SCRIPT,
        protocol.CHECK_SCRIPT, protocol.CONFIGS])
    assert (home / protocol.CONFIGS / "demo.py").read_text() == (
        ROOT / "configs" / "demo.py").read_text()
    _fake(home / ".local" / "bin", "uv", 'echo "$* | $(env | grep ^UV_ | sort | xargs)" >> '
          '"$HOME/uv.log"\ncase "$1" in --version) echo "uv $UV_VERSION";;\n'
          '  venv) mkdir -p "${@: -1}/bin" && touch "${@: -1}/bin/python";; esac\n')
    done = subprocess.run(["bash", "-c", run], cwd=home, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **defaults, **build_args,
                               "HOME": str(home)},
                          timeout=60)
    assert done.returncode == 0, done.stderr
    calls = (home / "uv.log").read_text().splitlines()
    assert calls[1].startswith(f"venv --quiet --clear --python 3.11.9 {protocol.VENV} |")
    assert calls[2].startswith(f"pip install --quiet --python {protocol.VENV}/bin/python "
                               f"--constraint {protocol.CONSTRAINTS} "
                               "vitpod-0.1.0-py3-none-any.whl[tpu] |")
    assert all("UV_NO_CACHE=1 UV_PYTHON_PREFERENCE=only-managed" in c for c in calls[1:])
    assert (home / protocol.VENV / "bin" / "python").exists()
    assert not (home / "vitpod-0.1.0-py3-none-any.whl").exists()
    assert not (home / ".cache").exists()
    assert jobset.IMAGE_PYTHON == f"{env['HOME']}/{protocol.VENV}/bin/python"
    assert env["PATH"].startswith(f"{jobset.IMAGE_HOME}/${{VENV}}/bin:")


def test_the_source_digest_names_a_context_whatever_its_wheels_timestamps(tmp_path):
    def context(name, stamp, text="x = 1\n"):
        (tmp_path / name / "configs").mkdir(parents=True)
        (tmp_path / name / "configs" / "demo.py").write_text("c = 1\n")
        with zipfile.ZipFile(tmp_path / name / "vitpod-0.1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(zipfile.ZipInfo("vitpod/a.py", stamp), text)
        return image.source_digest(str(tmp_path / name))

    first = context("a", (2020, 1, 1, 0, 0, 0))
    assert context("b", (2026, 5, 4, 3, 2, 0)) == first
    assert context("c", (2020, 1, 1, 0, 0, 0), "x = 2\n") != first


@pytest.mark.parametrize("said, code, expected", [("subprocess exited on killed", 1, 137),
                                                  ("subprocess exited on terminated", 1, 143),
                                                  ("Traceback ...", 1, 1), ("", -9, 137),
                                                  ("", 42, 42)])
def test_a_pods_exit_code_is_a_containers(tmp_path, said, code, expected):
    (tmp_path / "log").write_text(f"step 3\n{said}\nsubprocess exited with status 1\n")
    assert container_code(code, str(tmp_path / "log")) == expected


def test_make_image_dry_run_prints_the_build():
    done = subprocess.run(["make", "-s", "image", "DRY_RUN=1", f"POD_ENV={os.devnull}",
                           f"IMAGE={BASE['IMAGE']}", f"PYTHON={sys.executable}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = done.stdout.splitlines()
    tool = shlex.split(lines[-1])[0] if lines else ""
    if done.returncode and "neither is on PATH" in done.stderr:
        pytest.skip("no docker or podman client here")
    assert done.returncode == 0, done.stderr
    assert tool in image.TOOLS and f"-t {BASE['IMAGE']}" in lines[-1]
    assert "pip wheel --no-deps" in lines[0]


# --- In the pod --------------------------------------------------------------------------------
@pytest.mark.parametrize("hosts, joins", [("h0.js,h1.js,h2.js,h3.js", True),
                                          ("localhost", False), (None, False)])
def test_a_gke_pod_of_a_multi_host_slice_joins_the_job(monkeypatch, hosts, joins):
    calls = []
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.delenv(protocol.SIM_WORKER0_ENV, raising=False)
    monkeypatch.setenv(protocol.INIT_TIMEOUT_ENV, "900")
    if hosts is None:
        monkeypatch.delenv(protocol.WORKER_HOSTNAMES_ENV, raising=False)
    else:
        monkeypatch.setenv(protocol.WORKER_HOSTNAMES_ENV, hosts)
    distributed.initialize()
    assert calls == ([{"initialization_timeout": 900}] if joins else [])


def test_a_preempted_trainer_exits_with_the_code_the_jobset_restarts(colors, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitpod.train", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", f"--config.data.train_dir={colors / 'train'}",
         f"--config.data.val_dir={colors / 'val'}", "--config.total_steps=400",
         f"--exit_code_if_preempted={jobset.PREEMPTED_EXIT_CODE}"], cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 3/400" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 42, out[-3000:]
    assert "preempted at step" in out and not (tmp_path / "DONE").exists()
