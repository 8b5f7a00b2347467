/* set-labels, in C: adds the configured labels to every object.
 *
 * Config: `{"labels": {"team": "web"}}`. `transformer.h` is generated from the WIT package
 * by `wit-bindgen c wit --world transformer`; examples/plugins/build.sh (and
 * docs/plugins/c.md) show the whole build. */
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "transformer.h"

static const char USAGE[] = "set-labels needs {\"labels\": {\"name\": \"value\", ...}}";

/* The configured labels (an object of strings), or NULL. Free with json_free. */
static json *labels_of(const transformer_string_t *config) {
  json *value = json_parse((const char *)config->ptr, config->len);
  json *labels = json_get(value, "labels");
  int ok = labels && labels->kind == JSON_OBJECT;
  for (size_t i = 0; ok && i < labels->count; i++) ok = labels->items[i]->kind == JSON_STRING;
  if (!ok) {
    json_free(value);
    return NULL;
  }
  return value;
}

bool exports_transformer_validate_config(transformer_string_t *config, transformer_string_t *err) {
  json *value = labels_of(config);
  transformer_string_free(config);
  if (!value) {
    transformer_string_dup(err, USAGE);
    return false;
  }
  json_free(value);
  return true;
}

/* Refuses the commit with one finding about object `index`. */
static bool refuse(transformer_list_finding_t *err, uint32_t index, const char *message) {
  transformer_finding_t *f = calloc(1, sizeof(*f));
  if (!f) abort();
  f->severity = SLUICE_PLUGIN_TYPES_SEVERITY_ERROR;
  transformer_string_dup(&f->message, message);
  f->object.is_some = true;
  f->object.val.index = index;
  transformer_string_dup(&f->object.val.api_version, "");
  transformer_string_dup(&f->object.val.kind, "");
  transformer_string_dup(&f->object.val.namespace_, "");
  transformer_string_dup(&f->object.val.name, "");
  f->rule.is_some = true;
  transformer_string_dup(&f->rule.val, "set-labels");
  err->ptr = f;
  err->len = 1;
  return false;
}

bool exports_transformer_transform(transformer_context_t *ctx, transformer_list_object_t *objects,
                                   transformer_list_object_t *ret, transformer_list_finding_t *err) {
  json *config = labels_of(&ctx->config);
  if (!config) return refuse(err, 0, USAGE);
  const json *labels = json_get(config, "labels");
  for (size_t i = 0; i < objects->len; i++) {
    transformer_string_t *text = &objects->ptr[i].json;
    json *object = json_parse((const char *)text->ptr, text->len);
    json *target = json_object_at(json_object_at(object, "metadata"), "labels");
    if (!target) return refuse(err, (uint32_t)i, "metadata.labels is not an object");
    for (size_t l = 0; l < labels->count; l++)
      if (!json_set_string(target, labels->keys[l], labels->keylens[l], labels->items[l]->text,
                           labels->items[l]->len))
        abort();
    size_t len;
    char *out = json_write(object, &len);
    if (!out) abort();
    json_free(object);
    /* The object keeps its origin; only its text changes (the host frees both). */
    transformer_string_free(text);
    text->ptr = (uint8_t *)out;
    text->len = len;
  }
  json_free(config);
  transformer_context_free(ctx);
  *ret = *objects; /* the list now belongs to the host */
  return true;
}
