// no-latest-tag, in JavaScript: images must name a tag other than `latest`, or a digest.
// The same rule as the Rust plugin `plugins/no-latest-tag`, against `sluice:plugin@0.1.0`:
// each object crosses as JSON text, which the JavaScript engine parses natively. Under
// 0.2.0 (objects as handles) this plugin measured 928 µs per object with a call per field
// and 210 µs with one `findStrings` per object, against 34 µs here: a call into the host
// from componentize-js 0.23 costs tens of microseconds (docs/performance.md). Built with
// componentize-js:
//
//   componentize-js --wit ../../../../wit --world-name validator -o no_latest_tag.wasm plugin.js

const POD_SPEC = {
  Pod: ['spec'],
  Deployment: ['spec', 'template', 'spec'],
  ReplicaSet: ['spec', 'template', 'spec'],
  StatefulSet: ['spec', 'template', 'spec'],
  DaemonSet: ['spec', 'template', 'spec'],
  Job: ['spec', 'template', 'spec'],
  ReplicationController: ['spec', 'template', 'spec'],
  CronJob: ['spec', 'jobTemplate', 'spec', 'template', 'spec'],
  PodTemplate: ['template', 'spec'],
};
const CONTAINER_LISTS = ['initContainers', 'containers', 'ephemeralContainers'];

// [name, tag, digest] of an image reference; a ':' before the last '/' is a port.
function parseImage(image) {
  const at = image.indexOf('@');
  const rest = at < 0 ? image : image.slice(0, at);
  const digest = at < 0 ? null : image.slice(at + 1);
  const slash = rest.lastIndexOf('/') + 1;
  const colon = rest.lastIndexOf(':');
  if (colon < slash) return [rest, null, digest];
  return [rest.slice(0, colon), rest.slice(colon + 1), digest];
}

export function validateConfig(config) {
  const value = JSON.parse(config);
  if (value !== null && Object.keys(value).length > 0) {
    throw 'no-latest-tag takes no configuration';
  }
}

export function validate(ctx, objects) {
  const findings = [];
  objects.forEach((obj, index) => {
    const value = JSON.parse(obj.json);
    const path = POD_SPEC[value.kind];
    if (!path) return;
    let spec = value;
    for (const key of path) spec = spec && typeof spec === 'object' ? spec[key] : undefined;
    if (!spec || typeof spec !== 'object') return;
    const meta = value.metadata || {};
    const ref = {
      index,
      apiVersion: value.apiVersion || '',
      kind: value.kind || '',
      namespace: meta.namespace || '',
      name: meta.name || '',
    };
    for (const list of CONTAINER_LISTS) {
      (spec[list] || []).forEach((container, i) => {
        const image = container.image;
        if (typeof image !== 'string') return;
        const [, tag, digest] = parseImage(image);
        if (digest === null && (tag === null || tag === 'latest')) {
          findings.push({
            severity: 'error',
            message: `image ${image} uses the latest tag; pin a version or a digest`,
            object: ref,
            field: `${path.join('.')}.${list}[${i}].image`,
            proposedValue: undefined,
            rule: 'no-latest-tag',
          });
        }
      });
    }
  });
  return findings;
}
