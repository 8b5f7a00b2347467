/* no-latest-tag, in C: images must name a tag other than `latest`, or a digest.
 *
 * The same rule as the Rust plugin `plugins/no-latest-tag`, against the same contract,
 * `sluice:plugin@0.2.0`: the objects stay in the host and the plugin reads only the fields
 * it needs (`get-string`, `len`), so nothing is parsed here. `validator.h` is generated from
 * the WIT package by `wit-bindgen c wit/v0.2 --world validator`; examples/plugins/build.sh
 * shows the whole build. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "validator.h"

typedef sluice_plugin_types_borrow_object_t object;

/* Where each workload kind keeps its pod spec, as a JSON Pointer and a field path. */
static const struct {
  const char *kind, *pointer, *field;
} POD_SPEC[] = {
    {"Pod", "/spec", "spec"},
    {"Deployment", "/spec/template/spec", "spec.template.spec"},
    {"ReplicaSet", "/spec/template/spec", "spec.template.spec"},
    {"StatefulSet", "/spec/template/spec", "spec.template.spec"},
    {"DaemonSet", "/spec/template/spec", "spec.template.spec"},
    {"Job", "/spec/template/spec", "spec.template.spec"},
    {"ReplicationController", "/spec/template/spec", "spec.template.spec"},
    {"CronJob", "/spec/jobTemplate/spec/template/spec", "spec.jobTemplate.spec.template.spec"},
    {"PodTemplate", "/template/spec", "template.spec"},
};
static const char *CONTAINER_LISTS[] = {"initContainers", "containers", "ephemeralContainers"};

/* The string at `pointer` (owned by the caller), or an empty one. */
static validator_string_t get_string(object o, const char *pointer) {
  validator_string_t p, out = {0};
  validator_string_set(&p, pointer);
  if (!sluice_plugin_types_method_object_get_string(o, &p, &out)) validator_string_dup(&out, "");
  return out;
}

static int equals(const validator_string_t *s, const char *text) {
  return s->len == strlen(text) && memcmp(s->ptr, text, s->len) == 0;
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

static void check(findings *out, uint32_t index, object o) {
  validator_string_t kind = get_string(o, "/kind");
  for (size_t k = 0; k < sizeof(POD_SPEC) / sizeof(POD_SPEC[0]); k++) {
    if (!equals(&kind, POD_SPEC[k].kind)) continue;
    for (size_t l = 0; l < 3; l++) {
      char pointer[128];
      snprintf(pointer, sizeof pointer, "%s/%s", POD_SPEC[k].pointer, CONTAINER_LISTS[l]);
      validator_string_t p;
      validator_string_set(&p, pointer);
      uint32_t count = 0;
      if (!sluice_plugin_types_method_object_len(o, &p, &count)) continue;
      for (uint32_t i = 0; i < count; i++) {
        snprintf(pointer, sizeof pointer, "%s/%s/%u/image", POD_SPEC[k].pointer, CONTAINER_LISTS[l], i);
        validator_string_t image = {0};
        validator_string_set(&p, pointer);
        if (!sluice_plugin_types_method_object_get_string(o, &p, &image)) continue;
        if (pinned((const char *)image.ptr, image.len)) {
          validator_string_free(&image);
          continue;
        }
        validator_finding_t *f = next_finding(out);
        f->severity = SLUICE_PLUGIN_TYPES_SEVERITY_ERROR;
        size_t n = image.len + 64;
        char *message = malloc(n);
        if (!message) abort();
        snprintf(message, n, "image %.*s uses the latest tag; pin a version or a digest", (int)image.len,
                 (const char *)image.ptr);
        validator_string_set(&f->message, message); /* the host frees it after the call */
        validator_string_free(&image);
        f->object.is_some = true;
        f->object.val.index = index;
        f->object.val.api_version = get_string(o, "/apiVersion");
        validator_string_dup_n(&f->object.val.kind, (const char *)kind.ptr, kind.len);
        f->object.val.namespace_ = get_string(o, "/metadata/namespace");
        f->object.val.name = get_string(o, "/metadata/name");
        char field[160];
        snprintf(field, sizeof field, "%s.%s[%u].image", POD_SPEC[k].field, CONTAINER_LISTS[l], i);
        f->field.is_some = true;
        validator_string_dup(&f->field.val, field);
        f->rule.is_some = true;
        validator_string_dup(&f->rule.val, "no-latest-tag");
      }
    }
    break;
  }
  validator_string_free(&kind);
}

bool exports_validator_validate_config(validator_string_t *config, validator_string_t *err) {
  /* No configuration: `null` or `{}`, white space allowed. */
  char text[8];
  size_t used = 0;
  int ok = 1;
  for (size_t i = 0; i < config->len && ok; i++) {
    char c = (char)config->ptr[i];
    if (c == ' ' || c == '\n' || c == '\t' || c == '\r') continue;
    if (used == sizeof text) ok = 0;
    else text[used++] = c;
  }
  ok = ok && ((used == 2 && memcmp(text, "{}", 2) == 0) || (used == 4 && memcmp(text, "null", 4) == 0));
  validator_string_free(config);
  if (!ok) validator_string_dup(err, "no-latest-tag takes no configuration");
  return ok;
}

void exports_validator_validate(validator_context_t *ctx, validator_list_own_object_t *objects,
                                validator_list_finding_t *ret) {
  findings out = {0};
  for (size_t i = 0; i < objects->len; i++)
    check(&out, (uint32_t)i, sluice_plugin_types_borrow_object(objects->ptr[i]));
  validator_list_own_object_free(objects);
  validator_context_free(ctx);
  ret->ptr = out.ptr;
  ret->len = out.len;
}
