/* A small JSON reader and writer for the C example plugins.
 *
 * sluice hands a plugin each object as JSON text. Any C JSON library that compiles for
 * wasm32-wasi works (cJSON, jansson, yyjson: add its .c files to the build); these
 * examples carry this one so that they build from Debian's clang and wasi-libc alone.
 *
 * Numbers keep their text, so an object goes out exactly as precise as it came in.
 * Strings are UTF-8 with their length (they may hold NUL). */
#ifndef SLUICE_EXAMPLE_JSON_H
#define SLUICE_EXAMPLE_JSON_H

#include <stddef.h>

typedef enum { JSON_NULL, JSON_FALSE, JSON_TRUE, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_kind;

typedef struct json json;

struct json {
  json_kind kind;
  char *text;    /* JSON_STRING: the decoded string; JSON_NUMBER: the number as written */
  size_t len;    /* length of text */
  size_t count;  /* JSON_ARRAY, JSON_OBJECT: number of items */
  size_t cap;
  char **keys;   /* JSON_OBJECT: key i (NUL-terminated, keylens[i] bytes) */
  size_t *keylens;
  json **items;  /* JSON_ARRAY: item i; JSON_OBJECT: the value of key i */
};

/* Parses `len` bytes. Returns NULL on malformed input or when out of memory. */
json *json_parse(const char *text, size_t len);
/* Frees a value and everything in it. */
void json_free(json *value);

/* The member `key` of an object, or NULL (also when `value` is not an object). */
json *json_get(const json *value, const char *key);
/* The member `key` of an object, created as an empty object when missing. NULL when
 * `value` is not an object, when the member exists and is not an object, or out of memory. */
json *json_object_at(json *value, const char *key);
/* Sets member `key` of an object to a string (replacing any value). 0 when out of memory. */
int json_set_string(json *object, const char *key, size_t keylen, const char *text, size_t len);
/* A new empty object, or NULL. */
json *json_new_object(void);

/* Serialises compactly. Returns a malloc'd buffer (length in *len), or NULL. */
char *json_write(const json *value, size_t *len);

#endif
