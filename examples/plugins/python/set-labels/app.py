"""set-labels, in Python: adds the configured labels to every object.

Config: `{"labels": {"team": "web"}}`. Built with componentize-py:

    componentize-py -d ../../../../wit -w transformer componentize app -o set_labels.wasm
"""

import json

import wit_world
from wit_world.imports.types import Context, Object
from componentize_py_types import Err


def labels_of(config: str) -> dict:
    value = json.loads(config)
    labels = value.get("labels") if isinstance(value, dict) else None
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise Err('set-labels needs {"labels": {"name": "value", ...}}')
    return labels


class WitWorld(wit_world.WitWorld):
    def validate_config(self, config: str) -> None:
        labels_of(config)

    def transform(self, ctx: Context, objects: list[Object]) -> list[Object]:
        labels = labels_of(ctx.config)
        out = []
        for obj in objects:
            value = json.loads(obj.json)
            meta = value.setdefault("metadata", {})
            meta.setdefault("labels", {}).update(labels)
            out.append(Object(json=json.dumps(value), origin=obj.origin))
        return out
