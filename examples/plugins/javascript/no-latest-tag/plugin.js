// no-latest-tag, in JavaScript: images must name a tag other than `latest`, or a digest.
// The same rule as the Rust plugin `plugins/no-latest-tag`, against the same contract,
// `sluice:plugin@0.2.0` (`wit/v0.2`): the objects stay in the host and the plugin reads only
// the fields it needs (`getString`, `len`). Built with componentize-js:
//
//   componentize-js --wit ../../../../wit/v0.2 --world-name validator -o no_latest_tag.wasm plugin.js

// Where each workload kind keeps its pod spec, as a JSON Pointer.
const POD_SPEC = {
  Pod: '/spec',
  Deployment: '/spec/template/spec',
  ReplicaSet: '/spec/template/spec',
  StatefulSet: '/spec/template/spec',
  DaemonSet: '/spec/template/spec',
  Job: '/spec/template/spec',
  ReplicationController: '/spec/template/spec',
  CronJob: '/spec/jobTemplate/spec/template/spec',
  PodTemplate: '/template/spec',
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
    const kind = obj.getString('/kind') ?? '';
    const base = POD_SPEC[kind];
    if (!base) return;
    const ref = {
      index,
      apiVersion: obj.getString('/apiVersion') ?? '',
      kind,
      namespace: obj.getString('/metadata/namespace') ?? '',
      name: obj.getString('/metadata/name') ?? '',
    };
    const field = base.slice(1).replaceAll('/', '.');
    for (const list of CONTAINER_LISTS) {
      const n = obj.len(`${base}/${list}`) ?? 0;
      for (let i = 0; i < n; i++) {
        const image = obj.getString(`${base}/${list}/${i}/image`);
        if (image === undefined || image === null) continue;
        const [, tag, digest] = parseImage(image);
        if (digest === null && (tag === null || tag === 'latest')) {
          findings.push({
            severity: 'error',
            message: `image ${image} uses the latest tag; pin a version or a digest`,
            object: ref,
            field: `${field}.${list}[${i}].image`,
            proposedValue: undefined,
            rule: 'no-latest-tag',
          });
        }
      }
    }
  });
  return findings;
}
