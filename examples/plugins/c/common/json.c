/* A small JSON reader and writer for the C example plugins: see json.h. */
#include "json.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Deeper nesting than this is refused rather than recursed into. */
#define MAX_DEPTH 512

typedef struct {
  const char *p, *end;
  int depth;
} reader;

static void skip_space(reader *r) {
  while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r')) r->p++;
}

static json *new_value(json_kind kind) {
  json *v = calloc(1, sizeof(json));
  if (v) v->kind = kind;
  return v;
}

/* Appends to a growable byte buffer. */
typedef struct {
  char *data;
  size_t len, cap;
} buffer;

static int put(buffer *b, const char *bytes, size_t n) {
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 64;
    while (b->len + n + 1 > cap) cap *= 2;
    char *data = realloc(b->data, cap);
    if (!data) return 0;
    b->data = data;
    b->cap = cap;
  }
  memcpy(b->data + b->len, bytes, n);
  b->len += n;
  b->data[b->len] = 0;
  return 1;
}

static int put_utf8(buffer *b, uint32_t c) {
  char out[4];
  size_t n;
  if (c < 0x80) {
    out[0] = (char)c;
    n = 1;
  } else if (c < 0x800) {
    out[0] = (char)(0xC0 | (c >> 6));
    out[1] = (char)(0x80 | (c & 0x3F));
    n = 2;
  } else if (c < 0x10000) {
    out[0] = (char)(0xE0 | (c >> 12));
    out[1] = (char)(0x80 | ((c >> 6) & 0x3F));
    out[2] = (char)(0x80 | (c & 0x3F));
    n = 3;
  } else {
    out[0] = (char)(0xF0 | (c >> 18));
    out[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((c >> 6) & 0x3F));
    out[3] = (char)(0x80 | (c & 0x3F));
    n = 4;
  }
  return put(b, out, n);
}

static int hex4(reader *r, uint32_t *out) {
  if (r->end - r->p < 4) return 0;
  uint32_t c = 0;
  for (int i = 0; i < 4; i++) {
    char h = *r->p++;
    c <<= 4;
    if (h >= '0' && h <= '9') c |= (uint32_t)(h - '0');
    else if (h >= 'a' && h <= 'f') c |= (uint32_t)(h - 'a' + 10);
    else if (h >= 'A' && h <= 'F') c |= (uint32_t)(h - 'A' + 10);
    else return 0;
  }
  *out = c;
  return 1;
}

/* Reads a string after its opening quote into `b`. */
static int read_string(reader *r, buffer *b) {
  if (!put(b, "", 0)) return 0;
  while (r->p < r->end) {
    const char *start = r->p;
    while (r->p < r->end && *r->p != '"' && *r->p != '\\' && (unsigned char)*r->p >= 0x20) r->p++;
    if (!put(b, start, (size_t)(r->p - start))) return 0;
    if (r->p >= r->end || (unsigned char)*r->p < 0x20) return 0;
    if (*r->p++ == '"') return 1;
    if (r->p >= r->end) return 0;
    char e = *r->p++;
    uint32_t c;
    switch (e) {
      case '"': c = '"'; break;
      case '\\': c = '\\'; break;
      case '/': c = '/'; break;
      case 'b': c = '\b'; break;
      case 'f': c = '\f'; break;
      case 'n': c = '\n'; break;
      case 'r': c = '\r'; break;
      case 't': c = '\t'; break;
      case 'u':
        if (!hex4(r, &c)) return 0;
        if (c >= 0xD800 && c < 0xDC00) {
          uint32_t low;
          if (r->end - r->p < 6 || r->p[0] != '\\' || r->p[1] != 'u') return 0;
          r->p += 2;
          if (!hex4(r, &low) || low < 0xDC00 || low >= 0xE000) return 0;
          c = 0x10000 + ((c - 0xD800) << 10) + (low - 0xDC00);
        } else if (c >= 0xDC00 && c < 0xE000) {
          return 0;
        }
        break;
      default: return 0;
    }
    if (!put_utf8(b, c)) return 0;
  }
  return 0;
}

static json *read_value(reader *r);

static int push(json *v, char *key, size_t keylen, json *item) {
  if (v->count == v->cap) {
    size_t cap = v->cap ? v->cap * 2 : 4;
    json **items = realloc(v->items, cap * sizeof(json *));
    if (!items) return 0;
    v->items = items;
    if (v->kind == JSON_OBJECT) {
      char **keys = realloc(v->keys, cap * sizeof(char *));
      if (!keys) return 0;
      v->keys = keys;
      size_t *keylens = realloc(v->keylens, cap * sizeof(size_t));
      if (!keylens) return 0;
      v->keylens = keylens;
    }
    v->cap = cap;
  }
  if (v->kind == JSON_OBJECT) {
    v->keys[v->count] = key;
    v->keylens[v->count] = keylen;
  }
  v->items[v->count++] = item;
  return 1;
}

static json *read_container(reader *r, json_kind kind, char close) {
  json *v = new_value(kind);
  if (!v || ++r->depth > MAX_DEPTH) goto fail;
  skip_space(r);
  if (r->p < r->end && *r->p == close) {
    r->p++;
    r->depth--;
    return v;
  }
  for (;;) {
    buffer key = {0};
    if (kind == JSON_OBJECT) {
      skip_space(r);
      if (r->p >= r->end || *r->p++ != '"' || !read_string(r, &key)) goto fail_key;
      skip_space(r);
      if (r->p >= r->end || *r->p++ != ':') goto fail_key;
    }
    json *item = read_value(r);
    if (!item) goto fail_key;
    if (!push(v, key.data, key.len, item)) {
      json_free(item);
      goto fail_key;
    }
    skip_space(r);
    if (r->p >= r->end) goto fail;
    char c = *r->p++;
    if (c == close) break;
    if (c != ',') goto fail;
    continue;
  fail_key:
    free(key.data);
    goto fail;
  }
  r->depth--;
  return v;
fail:
  json_free(v);
  return NULL;
}

static int literal(reader *r, const char *word) {
  size_t n = strlen(word);
  if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0) return 0;
  r->p += n;
  return 1;
}

static json *read_value(reader *r) {
  skip_space(r);
  if (r->p >= r->end) return NULL;
  char c = *r->p;
  if (c == '{') {
    r->p++;
    return read_container(r, JSON_OBJECT, '}');
  }
  if (c == '[') {
    r->p++;
    return read_container(r, JSON_ARRAY, ']');
  }
  if (c == '"') {
    r->p++;
    buffer b = {0};
    json *v = new_value(JSON_STRING);
    if (!v || !read_string(r, &b)) {
      free(b.data);
      free(v);
      return NULL;
    }
    v->text = b.data;
    v->len = b.len;
    return v;
  }
  if (literal(r, "null")) return new_value(JSON_NULL);
  if (literal(r, "true")) return new_value(JSON_TRUE);
  if (literal(r, "false")) return new_value(JSON_FALSE);
  /* A number: -?digits(.digits)?([eE][+-]?digits)?, kept as written. */
  const char *start = r->p;
  if (r->p < r->end && *r->p == '-') r->p++;
  const char *digits = r->p;
  while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
  if (r->p == digits) return NULL;
  if (r->p < r->end && *r->p == '.') {
    const char *frac = ++r->p;
    while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
    if (r->p == frac) return NULL;
  }
  if (r->p < r->end && (*r->p == 'e' || *r->p == 'E')) {
    r->p++;
    if (r->p < r->end && (*r->p == '+' || *r->p == '-')) r->p++;
    const char *exp = r->p;
    while (r->p < r->end && *r->p >= '0' && *r->p <= '9') r->p++;
    if (r->p == exp) return NULL;
  }
  json *v = new_value(JSON_NUMBER);
  buffer b = {0};
  if (!v || !put(&b, start, (size_t)(r->p - start))) {
    free(v);
    free(b.data);
    return NULL;
  }
  v->text = b.data;
  v->len = b.len;
  return v;
}

json *json_parse(const char *text, size_t len) {
  reader r = {text, text + len, 0};
  json *v = read_value(&r);
  skip_space(&r);
  if (v && r.p != r.end) {
    json_free(v);
    return NULL;
  }
  return v;
}

void json_free(json *v) {
  if (!v) return;
  for (size_t i = 0; i < v->count; i++) {
    if (v->keys) free(v->keys[i]);
    json_free(v->items[i]);
  }
  free(v->keys);
  free(v->keylens);
  free(v->items);
  free(v->text);
  free(v);
}

static long find(const json *v, const char *key, size_t keylen) {
  if (!v || v->kind != JSON_OBJECT) return -1;
  for (size_t i = 0; i < v->count; i++)
    if (v->keylens[i] == keylen && memcmp(v->keys[i], key, keylen) == 0) return (long)i;
  return -1;
}

json *json_get(const json *v, const char *key) {
  long i = find(v, key, strlen(key));
  return i < 0 ? NULL : v->items[i];
}

json *json_new_object(void) { return new_value(JSON_OBJECT); }

static char *copy(const char *text, size_t len) {
  char *out = malloc(len + 1);
  if (out) {
    memcpy(out, text, len);
    out[len] = 0;
  }
  return out;
}

json *json_object_at(json *v, const char *key) {
  if (!v || v->kind != JSON_OBJECT) return NULL;
  size_t keylen = strlen(key);
  long i = find(v, key, keylen);
  if (i >= 0) return v->items[i]->kind == JSON_OBJECT ? v->items[i] : NULL;
  json *member = new_value(JSON_OBJECT);
  char *k = copy(key, keylen);
  if (!member || !k || !push(v, k, keylen, member)) {
    free(member);
    free(k);
    return NULL;
  }
  return member;
}

int json_set_string(json *v, const char *key, size_t keylen, const char *text, size_t len) {
  if (!v || v->kind != JSON_OBJECT) return 0;
  json *s = new_value(JSON_STRING);
  char *t = copy(text, len);
  if (!s || !t) {
    free(s);
    free(t);
    return 0;
  }
  s->text = t;
  s->len = len;
  long i = find(v, key, keylen);
  if (i >= 0) {
    json_free(v->items[i]);
    v->items[i] = s;
    return 1;
  }
  char *k = copy(key, keylen);
  if (!k || !push(v, k, keylen, s)) {
    free(k);
    json_free(s);
    return 0;
  }
  return 1;
}

static int write_string(buffer *b, const char *s, size_t len) {
  static const char hex[] = "0123456789abcdef";
  if (!put(b, "\"", 1)) return 0;
  size_t start = 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c != '"' && c != '\\' && c >= 0x20) continue;
    if (!put(b, s + start, i - start)) return 0;
    char esc[6] = {'\\', (char)c, 0, 0, 0, 0};
    size_t n = 2;
    if (c == '\n') esc[1] = 'n';
    else if (c == '\r') esc[1] = 'r';
    else if (c == '\t') esc[1] = 't';
    else if (c < 0x20) {
      esc[1] = 'u';
      esc[2] = '0';
      esc[3] = '0';
      esc[4] = hex[c >> 4];
      esc[5] = hex[c & 15];
      n = 6;
    }
    if (!put(b, esc, n)) return 0;
    start = i + 1;
  }
  return put(b, s + start, len - start) && put(b, "\"", 1);
}

static int write_value(buffer *b, const json *v) {
  switch (v->kind) {
    case JSON_NULL: return put(b, "null", 4);
    case JSON_FALSE: return put(b, "false", 5);
    case JSON_TRUE: return put(b, "true", 4);
    case JSON_NUMBER: return put(b, v->text, v->len);
    case JSON_STRING: return write_string(b, v->text, v->len);
    case JSON_ARRAY:
    case JSON_OBJECT: {
      int object = v->kind == JSON_OBJECT;
      if (!put(b, object ? "{" : "[", 1)) return 0;
      for (size_t i = 0; i < v->count; i++) {
        if (i && !put(b, ",", 1)) return 0;
        if (object && !(write_string(b, v->keys[i], v->keylens[i]) && put(b, ":", 1))) return 0;
        if (!write_value(b, v->items[i])) return 0;
      }
      return put(b, object ? "}" : "]", 1);
    }
  }
  return 0;
}

char *json_write(const json *v, size_t *len) {
  buffer b = {0};
  if (!write_value(&b, v)) {
    free(b.data);
    return NULL;
  }
  *len = b.len;
  return b.data;
}
