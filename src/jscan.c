/*
 * jscan: a JSON syntax checker (see jscan.h).  Iterative: containers are
 * tracked in a small stack of bits (object or array), so hostile nesting
 * costs no recursion.
 */
#include "jscan.h"

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

struct scan {
    const unsigned char *p, *end, *start;
    const char *what;
};

static void
skip_ws(struct scan *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r')) {
        s->p++;
    }
}

static int
bad(struct scan *s, const char *what)
{
    s->what = what;
    return -1;
}

/* One UTF-8 sequence starting at s->p (a byte >= 0x80). */
static int
utf8(struct scan *s)
{
    const unsigned char *p = s->p;
    unsigned c = *p, need;
    uint32_t cp;

    if (c >= 0xc2 && c <= 0xdf) {
        need = 1;
        cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        need = 2;
        cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        need = 3;
        cp = c & 0x07;
    } else {
        return bad(s, "invalid UTF-8");
    }
    if ((size_t)(s->end - p) <= need) {
        return bad(s, "invalid UTF-8");
    }
    for (unsigned i = 1; i <= need; i++) {
        if ((p[i] & 0xc0) != 0x80) {
            return bad(s, "invalid UTF-8");
        }
        cp = (cp << 6) | (p[i] & 0x3f);
    }
    if ((need == 2 && cp < 0x800) || (need == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff)) {
        return bad(s, "invalid UTF-8");
    }
    s->p += need + 1;
    return 0;
}

static int
hex4(struct scan *s)
{
    for (int i = 0; i < 4; i++, s->p++) {
        if (s->p >= s->end) {
            return bad(s, "invalid \\u escape");
        }
        unsigned char c = *s->p;
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) {
            return bad(s, "invalid \\u escape");
        }
    }
    return 0;
}

static int
string(struct scan *s)
{
    s->p++; /* the opening quote */
    while (s->p < s->end) {
        unsigned char c = *s->p;
        if (c == '"') {
            s->p++;
            return 0;
        }
        if (c < 0x20) {
            return bad(s, "control character in string");
        }
        if (c == '\\') {
            s->p++;
            if (s->p >= s->end) {
                break;
            }
            c = *s->p++;
            if (c == 'u') {
                if (hex4(s) < 0) {
                    return -1;
                }
            } else if (c != '"' && c != '\\' && c != '/' && c != 'b' && c != 'f' && c != 'n' &&
                       c != 'r' && c != 't') {
                return bad(s, "invalid escape");
            }
        } else if (c >= 0x80) {
            if (utf8(s) < 0) {
                return -1;
            }
        } else {
            s->p++;
        }
    }
    return bad(s, "unterminated string");
}

static bool
digit(const struct scan *s)
{
    return s->p < s->end && *s->p >= '0' && *s->p <= '9';
}

static int
number(struct scan *s)
{
    if (*s->p == '-') {
        s->p++;
    }
    if (!digit(s)) {
        return bad(s, "invalid number");
    }
    if (*s->p == '0') {
        s->p++;
    } else {
        while (digit(s)) {
            s->p++;
        }
    }
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (!digit(s)) {
            return bad(s, "invalid number");
        }
        while (digit(s)) {
            s->p++;
        }
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-')) {
            s->p++;
        }
        if (!digit(s)) {
            return bad(s, "invalid number");
        }
        while (digit(s)) {
            s->p++;
        }
    }
    return 0;
}

static int
literal(struct scan *s, const char *word, size_t n)
{
    if ((size_t)(s->end - s->p) < n) {
        return bad(s, "invalid literal");
    }
    for (size_t i = 0; i < n; i++) {
        if (s->p[i] != (unsigned char)word[i]) {
            return bad(s, "invalid literal");
        }
    }
    s->p += n;
    return 0;
}

/* A scalar value, or the opening of a container (returned in *OPEN). */
static int
value(struct scan *s, char *open)
{
    *open = 0;
    if (s->p >= s->end) {
        return bad(s, "value expected");
    }
    switch (*s->p) {
    case '{':
    case '[':
        *open = (char)*s->p++;
        return 0;
    case '"':
        return string(s);
    case 't':
        return literal(s, "true", 4);
    case 'f':
        return literal(s, "false", 5);
    case 'n':
        return literal(s, "null", 4);
    default:
        return number(s);
    }
}

static bool
top_is_object(const uint8_t *stack, int depth)
{
    return stack[(depth - 1) / 8] & (1u << ((depth - 1) % 8));
}

/* Append code point CP to OUT as UTF-8; false when it does not fit. */
static bool
put_utf8(uint32_t cp, char *out, size_t cap, size_t *len)
{
    unsigned char b[4];
    size_t k;

    if (cp < 0x80) {
        b[0] = (unsigned char)cp;
        k = 1;
    } else if (cp < 0x800) {
        b[0] = (unsigned char)(0xc0 | (cp >> 6));
        b[1] = (unsigned char)(0x80 | (cp & 0x3f));
        k = 2;
    } else if (cp < 0x10000) {
        b[0] = (unsigned char)(0xe0 | (cp >> 12));
        b[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        b[2] = (unsigned char)(0x80 | (cp & 0x3f));
        k = 3;
    } else {
        b[0] = (unsigned char)(0xf0 | (cp >> 18));
        b[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
        b[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        b[3] = (unsigned char)(0x80 | (cp & 0x3f));
        k = 4;
    }
    if (*len + k >= cap) {
        return false;
    }
    for (size_t i = 0; i < k; i++) {
        out[(*len)++] = (char)b[i];
    }
    return true;
}

static uint32_t
hexval(const char *p)
{
    uint32_t v = 0;

    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v = v * 16 + (uint32_t)(c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
    }
    return v;
}

int
jscan_string_decode(const char *p, size_t n, char *out, size_t cap)
{
    size_t len = 0;

    if (n < 2 || p[0] != '"' || p[n - 1] != '"' || cap == 0) {
        return -1;
    }
    for (size_t i = 1; i < n - 1;) {
        unsigned char c = (unsigned char)p[i];
        if (c != '\\') {
            if (len + 1 >= cap) {
                return -1;
            }
            out[len++] = (char)c;
            i++;
            continue;
        }
        char e = p[i + 1];
        i += 2;
        uint32_t cp;
        switch (e) {
        case '"': cp = '"'; break;
        case '\\': cp = '\\'; break;
        case '/': cp = '/'; break;
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u':
            cp = hexval(p + i);
            i += 4;
            if (cp >= 0xd800 && cp <= 0xdbff && i + 6 <= n - 1 && p[i] == '\\' && p[i + 1] == 'u') {
                uint32_t lo = hexval(p + i + 2);
                if (lo < 0xdc00 || lo > 0xdfff) {
                    return -1; /* a lone high surrogate */
                }
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                i += 6;
            } else if (cp >= 0xd800 && cp <= 0xdfff) {
                return -1; /* a lone surrogate: no string any parser agrees on */
            }
            break;
        default:
            return -1;
        }
        if (cp == 0 || !put_utf8(cp, out, cap, &len)) {
            return -1; /* NUL: a C string cannot carry it */
        }
    }
    out[len] = '\0';
    return (int)len;
}

int
jscan_object(const char *buf, size_t n, const char **what, size_t *at)
{
    return jscan_object_member(buf, n, NULL, NULL, what, at);
}

int
jscan_object_member(const char *buf, size_t n, const char *key, struct jscan_member *m,
                    const char **what, size_t *at)
{
    struct scan s = {(const unsigned char *)buf, (const unsigned char *)buf + n,
                     (const unsigned char *)buf, NULL};
    bool want = false; /* the value being scanned is KEY's */
    uint8_t stack[JSCAN_MAX_DEPTH / 8]; /* bit set: an object, clear: an array */
    enum { FIRST, NEXT, AFTER } st = FIRST; /* after '{' or '[', after ',', after a value */
    int depth = 1;
    int rc = -1;

    skip_ws(&s);
    if (s.p >= s.end || *s.p != '{') {
        s.what = "a JSON object expected";
        goto out;
    }
    s.p++;
    stack[0] = 1;
    if (m) {
        m->count = 0;
        m->off = m->len = 0;
        m->is_string = false;
    }
    while (depth > 0) {
        bool obj = top_is_object(stack, depth);
        unsigned char close = obj ? '}' : ']';
        skip_ws(&s);
        if (s.p >= s.end) {
            s.what = "unexpected end";
            goto out;
        }
        if (st == AFTER || (st == FIRST && *s.p == close)) {
            if (*s.p == close) {
                s.p++;
                depth--;
                st = AFTER;
                continue;
            }
            if (*s.p != ',') {
                s.what = "',' or end of container expected";
                goto out;
            }
            s.p++;
            st = NEXT;
            continue;
        }
        if (obj) {
            if (*s.p != '"') {
                s.what = "member name expected";
                goto out;
            }
            const unsigned char *name = s.p;
            if (string(&s) < 0) {
                goto out;
            }
            if (m && depth == 1) {
                char dec[64];
                int dl = jscan_string_decode((const char *)name, (size_t)(s.p - name), dec,
                                             sizeof(dec));
                want = dl >= 0 && strcmp(dec, key) == 0;
            }
            skip_ws(&s);
            if (s.p >= s.end || *s.p != ':') {
                s.what = "':' expected";
                goto out;
            }
            s.p++;
            skip_ws(&s);
        }
        char open;
        const unsigned char *v = s.p;
        if (value(&s, &open) < 0) {
            goto out;
        }
        if (want) {
            want = false;
            m->count++;
            m->off = (size_t)(v - s.start);
            m->len = (size_t)(s.p - v);
            m->is_string = !open && *v == '"';
        }
        if (!open) {
            st = AFTER;
            continue;
        }
        if (depth >= JSCAN_MAX_DEPTH) {
            s.what = "nested too deeply";
            goto out;
        }
        if (open == '{') {
            stack[depth / 8] |= (uint8_t)(1u << (depth % 8));
        } else {
            stack[depth / 8] &= (uint8_t)~(1u << (depth % 8));
        }
        depth++;
        st = FIRST;
    }
    skip_ws(&s);
    if (s.p != s.end) {
        s.what = "data after the object";
        goto out;
    }
    rc = 0;
out:
    if (rc < 0) {
        *what = s.what ? s.what : "invalid JSON";
        *at = (size_t)(s.p - s.start);
    }
    return rc;
}
