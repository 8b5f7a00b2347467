/* no-latest-tag, in C: images must name a tag other than `latest`, or a digest.
 *
 * The same rule as the Rust plugin `plugins/no-latest-tag`. `validator.h` is generated from
 * the WIT package by `wit-bindgen c wit --world validator`; examples/plugins/build.sh (and
 * docs/plugins/c.md) show the whole build. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "validator.h"

/* Where each workload kind keeps its pod spec. */
static const struct {
  const char *kind;
  const char *path[5];
} POD_SPEC[] = {
    {"Pod", {"spec"}},
    {"Deployment", {"spec", "template", "spec"}},
    {"ReplicaSet", {"spec", "template", "spec"}},
    {"StatefulSet", {"spec", "template", "spec"}},
    {"DaemonSet", {"spec", "template", "spec"}},
    {"Job", {"spec", "template", "spec"}},
    {"ReplicationController", {"spec", "template", "spec"}},
    {"CronJob", {"spec", "jobTemplate", "spec", "template", "spec"}},
    {"PodTemplate", {"template", "spec"}},
};
static const char *CONTAINER_LISTS[] = {"initContainers", "containers", "ephemeralContainers"};

static int is(const json *v, const char *text) {
  return v && v->kind == JSON_STRING && v->len == strlen(text) && memcmp(v->text, text, v->len) == 0;
}

/* Whether an image reference pins something: a digest, or a tag other than `latest`.
 * A ':' before the last '/' belongs to a registry port, not a tag. */
static int pinned(const char *image, size_t len) {
  const char *at = memchr(image, '@', len);
  if (at) return 1;
  size_t slash = 0;
  for (size_t i = 0; i < len; i++)
    if (image[i] == '/') slash = i + 1;
  const char *colon = NULL;
  for (size_t i = slash; i < len; i++)
    if (image[i] == ':') colon = image + i;
  if (!colon) return 0;
  size_t tag = len - (size_t)(colon + 1 - image);
  return !(tag == 6 && memcmp(colon + 1, "latest", 6) == 0);
}

static void string_of(validator_string_t *out, const json *v) {
  if (v && v->kind == JSON_STRING) validator_string_dup_n(out, v->text, v->len);
  else validator_string_dup(out, "");
}

/* A growable list of findings, handed to the host (which frees it after the call). */
typedef struct {
  validator_finding_t *ptr;
  size_t len, cap;
} findings;

static validator_finding_t *next_finding(findings *list) {
  if (list->len == list->cap) {
    size_t cap = list->cap ? list->cap * 2 : 8;
    validator_finding_t *ptr = realloc(list->ptr, cap * sizeof(*ptr));
    if (!ptr) abort();
    list->ptr = ptr;
    list->cap = cap;
  }
  validator_finding_t *f = &list->ptr[list->len++];
  memset(f, 0, sizeof(*f));
  return f;
}

static void check(findings *out, uint32_t index, const json *object) {
  const json *kind = json_get(object, "kind");
  for (size_t k = 0; k < sizeof(POD_SPEC) / sizeof(POD_SPEC[0]); k++) {
    if (!is(kind, POD_SPEC[k].kind)) continue;
    const json *spec = object;
    char path[64] = "";
    for (size_t p = 0; p < 5 && POD_SPEC[k].path[p]; p++) {
      spec = json_get(spec, POD_SPEC[k].path[p]);
      if (p) strcat(path, ".");
      strcat(path, POD_SPEC[k].path[p]);
    }
    if (!spec || spec->kind != JSON_OBJECT) return;
    const json *meta = json_get(object, "metadata");
    for (size_t l = 0; l < 3; l++) {
      const json *containers = json_get(spec, CONTAINER_LISTS[l]);
      if (!containers || containers->kind != JSON_ARRAY) continue;
      for (size_t i = 0; i < containers->count; i++) {
        const json *image = json_get(containers->items[i], "image");
        if (!image || image->kind != JSON_STRING || pinned(image->text, image->len)) continue;
        validator_finding_t *f = next_finding(out);
        f->severity = SLUICE_PLUGIN_TYPES_SEVERITY_ERROR;
        size_t n = image->len + 64;
        char *message = malloc(n);
        if (!message) abort();
        snprintf(message, n, "image %.*s uses the latest tag; pin a version or a digest", (int)image->len,
                 image->text);
        validator_string_set(&f->message, message); /* the host frees it after the call */
        f->object.is_some = true;
        f->object.val.index = index;
        string_of(&f->object.val.api_version, json_get(object, "apiVersion"));
        string_of(&f->object.val.kind, kind);
        string_of(&f->object.val.namespace_, json_get(meta, "namespace"));
        string_of(&f->object.val.name, json_get(meta, "name"));
        char field[128];
        snprintf(field, sizeof field, "%s.%s[%zu].image", path, CONTAINER_LISTS[l], i);
        f->field.is_some = true;
        validator_string_dup(&f->field.val, field);
        f->rule.is_some = true;
        validator_string_dup(&f->rule.val, "no-latest-tag");
      }
    }
    return;
  }
}

bool exports_validator_validate_config(validator_string_t *config, validator_string_t *err) {
  json *value = json_parse((const char *)config->ptr, config->len);
  int ok = value && (value->kind == JSON_NULL || (value->kind == JSON_OBJECT && value->count == 0));
  json_free(value);
  validator_string_free(config);
  if (!ok) validator_string_dup(err, "no-latest-tag takes no configuration");
  return ok;
}

void exports_validator_validate(validator_context_t *ctx, validator_list_object_t *objects,
                                validator_list_finding_t *ret) {
  findings out = {0};
  for (size_t i = 0; i < objects->len; i++) {
    validator_string_t *text = &objects->ptr[i].json;
    json *object = json_parse((const char *)text->ptr, text->len);
    if (object) check(&out, (uint32_t)i, object);
    json_free(object);
  }
  validator_list_object_free(objects);
  validator_context_free(ctx);
  ret->ptr = out.ptr;
  ret->len = out.len;
}
