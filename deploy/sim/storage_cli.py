"""The simulated `gcloud storage ls|cat|cp` and `storage buckets describe`: the bucket of the
GCS server on loopback that the rehearsal's workdir lives in."""

import json
import sys

from deploy.sim.cloud_state import fail, positional, scenario


def storage(verb: str, args: list[str]) -> None:
    from google.cloud import storage as gcs

    if verb == "buckets" and args[:1] == ["describe"]:
        print(json.dumps({"name": positional(args)[1].removeprefix("gs://"),
                          "location": scenario()["bucket_location"]}))
        return
    url = positional(args)[-1]
    bucket, _, prefix = url.removeprefix("gs://").partition("/")
    client = gcs.Client(project="test-project")
    if verb == "ls":
        names = [b.name for b in client.list_blobs(bucket, prefix=prefix)]
        if not names:
            fail("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.")
        for n in names:
            print(f"gs://{bucket}/{n}")
        return
    if verb == "cat":
        blob = client.bucket(bucket).blob(prefix)
        if not blob.exists():
            fail(f"ERROR: (gcloud.storage.cat) The following URLs matched no objects or "
                 f"files:\n-{url}")
        sys.stdout.buffer.write(blob.download_as_bytes())
        return
    if verb == "cp":  # cp LOCAL_FILE gs://BUCKET/OBJECT
        client.bucket(bucket).blob(prefix).upload_from_filename(positional(args)[0])
        return
    fail(f"sim gcloud: storage {verb} is not simulated", 2)
