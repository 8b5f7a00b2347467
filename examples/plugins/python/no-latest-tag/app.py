"""no-latest-tag, in Python: images must name a tag other than `latest`, or a digest.

The same rule as the Rust plugin `plugins/no-latest-tag`, against the same contract,
`sluice:plugin@0.2.0` (`wit/v0.2`): the objects stay in the host and the plugin reads only
the fields it needs (`get_string`, `len`), so nothing is parsed in Python. Built with
componentize-py:

    componentize-py -d ../../../../wit/v0.2 -w validator componentize app -o no_latest_tag.wasm
"""

import json

import wit_world
from wit_world.imports.types import Context, Finding, Object, ObjectRef, Severity
from componentize_py_types import Err

# Where each workload kind keeps its pod spec, as a JSON Pointer.
POD_SPEC = {
    "Pod": "/spec",
    "Deployment": "/spec/template/spec",
    "ReplicaSet": "/spec/template/spec",
    "StatefulSet": "/spec/template/spec",
    "DaemonSet": "/spec/template/spec",
    "Job": "/spec/template/spec",
    "ReplicationController": "/spec/template/spec",
    "CronJob": "/spec/jobTemplate/spec/template/spec",
    "PodTemplate": "/template/spec",
}
CONTAINER_LISTS = ["initContainers", "containers", "ephemeralContainers"]


def parse_image(image: str):
    """(name, tag, digest) of an image reference; a ':' before the last '/' is a port."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/") + 1
    colon = rest.rfind(":", slash)
    if colon < 0:
        return rest, None, digest or None
    return rest[:colon], rest[colon + 1 :], digest or None


class WitWorld(wit_world.WitWorld):
    def validate_config(self, config: str) -> None:
        value = json.loads(config)
        if value not in (None, {}):
            raise Err("no-latest-tag takes no configuration")

    def validate(self, ctx: Context, objects: list[Object]) -> list[Finding]:
        findings = []
        for index, obj in enumerate(objects):
            kind = obj.get_string("/kind") or ""
            base = POD_SPEC.get(kind)
            if base is None:
                continue
            ref = ObjectRef(
                index=index,
                api_version=obj.get_string("/apiVersion") or "",
                kind=kind,
                namespace=obj.get_string("/metadata/namespace") or "",
                name=obj.get_string("/metadata/name") or "",
            )
            field = base.strip("/").replace("/", ".")
            for lst in CONTAINER_LISTS:
                for i in range(obj.len(f"{base}/{lst}") or 0):
                    image = obj.get_string(f"{base}/{lst}/{i}/image")
                    if image is None:
                        continue
                    _, tag, digest = parse_image(image)
                    if digest is None and tag in (None, "latest"):
                        findings.append(
                            Finding(
                                severity=Severity.ERROR,
                                message=f"image {image} uses the latest tag; pin a version or a digest",
                                object=ref,
                                field=f"{field}.{lst}[{i}].image",
                                proposed_value=None,
                                rule="no-latest-tag",
                            )
                        )
        return findings
