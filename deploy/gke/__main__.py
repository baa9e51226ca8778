"""python3 -m deploy.gke {image|manifest|run|logs}: `make image`, `make gke-manifest`,
`make gke-run` and `make gke-logs`.

Same settings as `make pod-*` (deploy/pod.env or $POD_ENV, overridden by environment
variables). `manifest` prints the JobSet's YAML and nothing else on stdout (apply it with
`kubectl apply -f -`); messages and the one-line errors go to stderr, and an error comes
before anything is printed.
"""

import sys

from deploy import job
from deploy.gke import image, jobset, yamltext
from deploy.gke.run import GkeRun
from deploy.gke.settings import GkeSettings


def note(message: str) -> None:
    print(f"[gke-manifest] {message}", file=sys.stderr, flush=True)


def manifest(settings: GkeSettings) -> None:
    document = jobset.build(settings)
    if len(settings.slice_types) > 1 or len(settings.slice_counts) > 1:
        note(f"a JobSet asks for one shape: {settings.num_slices} x {settings.tpu_type}, the "
             "first of TPU_TYPES and of NUM_SLICES")
    job.preflight(settings, [(settings.tpu_type, settings.num_slices)], say=note,
              outcome="no manifest written")
    sys.stdout.write(yamltext.dump(document))


VERBS = {"image": image.build, "manifest": manifest,
         "run": lambda s: GkeRun(s).run(), "logs": lambda s: GkeRun(s).logs()}


def main(argv: list[str]) -> int:
    return job.main("deploy.gke", VERBS, GkeSettings, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
