// set-labels, in JavaScript: adds the configured labels to every object.
// Config: {"labels": {"team": "web"}}. Built with componentize-js:
//
//   componentize-js --wit ../../../../wit --world-name transformer -o set_labels.wasm plugin.js

function labelsOf(config) {
  const value = JSON.parse(config);
  const labels = value && value.labels;
  if (
    !labels ||
    typeof labels !== 'object' ||
    Object.values(labels).some((v) => typeof v !== 'string')
  ) {
    throw 'set-labels needs {"labels": {"name": "value", ...}}';
  }
  return labels;
}

export function validateConfig(config) {
  labelsOf(config);
}

export function transform(ctx, objects) {
  const labels = labelsOf(ctx.config);
  return objects.map((obj) => {
    const value = JSON.parse(obj.json);
    value.metadata = value.metadata || {};
    value.metadata.labels = Object.assign(value.metadata.labels || {}, labels);
    return { json: JSON.stringify(value), origin: obj.origin };
  });
}
