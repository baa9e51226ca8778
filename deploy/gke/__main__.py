"""python3 -m deploy.gke {image|manifest|run|logs}: `make image`, `make gke-manifest`,
`make gke-run` and `make gke-logs`.

Same settings as `make pod-*` (deploy/pod.env or $POD_ENV, overridden by environment
variables). `manifest` prints the JobSet's YAML and nothing else on stdout (apply it with
`kubectl apply -f -`); messages and the one-line errors go to stderr, and an error comes
before anything is printed.
"""

import os
import sys

from deploy.gcloud_cli import exit_code
from deploy.gke import image, jobset, yamltext
from deploy.gke.run import GkeRun
from deploy.pod import preflight
from deploy.settings import DEPLOY_DIR, Settings, load_settings


def note(message: str) -> None:
    print(f"[gke-manifest] {message}", file=sys.stderr, flush=True)


def manifest(settings: Settings) -> None:
    document = jobset.build(settings)
    if len(settings.slice_types) > 1 or len(settings.slice_counts) > 1:
        note(f"a JobSet asks for one shape: {settings.num_slices} x {settings.tpu_type}, the "
             "first of TPU_TYPES and of NUM_SLICES")
    preflight(settings, [(settings.tpu_type, settings.num_slices)], say=note,
              outcome="no manifest written")
    sys.stdout.write(yamltext.dump(document))


VERBS = {"image": image.build, "manifest": manifest,
         "run": lambda s: GkeRun(s).run(), "logs": lambda s: GkeRun(s).logs()}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in VERBS:
        print(f"usage: python3 -m deploy.gke {{{'|'.join(VERBS)}}}", file=sys.stderr)
        return 2
    def verb():
        path = os.environ.get("POD_ENV", os.path.join(DEPLOY_DIR, "pod.env"))
        VERBS[argv[1]](load_settings(path, dict(os.environ), tpu_vms=False))

    return exit_code(verb)

if __name__ == "__main__":
    sys.exit(main(sys.argv))
