"""The JobSet API (jobset.x-k8s.io/v1alpha2), the part vitpod writes, as a JSON-schema-like
dict, and a checker for it: the tests check every manifest against it, and the rehearsal's
simulated kubectl (deploy/sim/kubectl.py) refuses a manifest it finds fault with, as the API
server would. Standard library only.

Field by field from kubernetes-sigs/jobset v0.10.1 (the release xpk installs):
api/jobset/v1alpha2/jobset_types.go and its generated CRD,
config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml. Every Go type below is closed
(additionalProperties: False) with all of its fields; those vitpod does not write are `ANY`.
A ReplicatedJob's template is batch/v1's JobTemplateSpec, checked by kubernetes-validate.
"""

import re

ANY = {}
STRINGS = {"type": "array", "items": {"type": "string"}}
INT32 = {"type": "integer", "minimum": -2**31, "maximum": 2**31 - 1}
OBJECT_META = {  # metav1.ObjectMeta
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                   **dict.fromkeys(["generateName", "selfLink", "uid", "resourceVersion",
                                    "generation", "creationTimestamp", "deletionTimestamp",
                                    "deletionGracePeriodSeconds", "ownerReferences",
                                    "finalizers", "managedFields"], ANY)}}
FAILURE_POLICY_RULE = {
    "type": "object", "additionalProperties": False, "required": ["name", "action"],
    "properties": {
        # The webhook defaults an empty name, but the CRD requires the field.
        "name": {"type": "string", "pattern": r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
        "action": {"enum": ["FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"]},
        "onJobFailureReasons": STRINGS, "onJobFailureMessagePatterns": STRINGS,
        "targetReplicatedJobs": STRINGS}}
FAILURE_POLICY = {
    "type": "object", "additionalProperties": False,
    "properties": {"maxRestarts": INT32,
                   "restartStrategy": {"enum": ["Recreate", "BlockingRecreate"]},
                   "rules": {"type": "array", "items": FAILURE_POLICY_RULE}}}
REPLICATED_JOB = {
    "type": "object", "additionalProperties": False, "required": ["name", "template"],
    "properties": {"name": {"type": "string"}, "groupName": {"type": "string"},
                   "template": {"type": "object", "additionalProperties": False,
                                "properties": {"metadata": ANY, "spec": {"type": "object"}}},
                   "replicas": {**INT32, "minimum": 0}, "dependsOn": ANY}}
JOBSET = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "jobset.x-k8s.io/v1alpha2"}, "kind": {"const": "JobSet"},
        "metadata": OBJECT_META, "status": ANY,
        "spec": {"type": "object", "additionalProperties": False,
                 "properties": {"replicatedJobs": {"type": "array", "items": REPLICATED_JOB},
                                "failurePolicy": FAILURE_POLICY, "network": ANY,
                                "successPolicy": ANY, "startupPolicy": ANY,
                                "suspend": {"type": "boolean"}, "coordinator": ANY,
                                "managedBy": {"type": "string"},
                                "ttlSecondsAfterFinished": {**INT32, "minimum": 0}}}}}
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def schema_errors(value, schema, path="$") -> list[str]:
    """What in `value` the JSON-schema-like `schema` does not allow, one line each."""
    errors = []
    kind = schema.get("type")
    if kind == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
        return [f"{path}: {value!r} is not an integer"]
    if kind in _TYPES and not isinstance(value, _TYPES[kind]):
        return [f"{path}: {value!r} is not of type {kind}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value} < {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {value} > {schema['maximum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        errors += [f"{path}: {key!r} is required" for key in schema.get("required", [])
                   if key not in value]
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties", {})
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: {key!r} is not a field of this type")
            else:
                errors += schema_errors(item, extra, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors
