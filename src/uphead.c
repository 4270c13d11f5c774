/*
 * uphead: checks on an upstream's response head (see uphead.h).
 */
#include "uphead.h"

#include <string.h>
#include <strings.h>

#include "http.h"

/* RFC 9110 tchar */
static bool
is_tchar(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) {
        return true;
    }
    return c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* field-content: VCHAR, obs-text, SP and HTAB; no CTL (CR, LF, NUL among them) */
static bool
is_value_byte(unsigned char c)
{
    return c == '\t' || (c >= 0x20 && c != 0x7f);
}

enum uphead_kind
uphead_line(const char *p, size_t len, struct uphead_field *f, const char **why)
{
    size_t n = len;

    /* exactly one line end: CRLF, or a bare LF (which libcurl accepts) */
    if (n >= 2 && p[n - 2] == '\r' && p[n - 1] == '\n') {
        n -= 2;
    } else if (n >= 1 && p[n - 1] == '\n') {
        n -= 1;
    } else {
        *why = "header line without a line end";
        return UPHEAD_BAD;
    }
    if (n == 0) {
        return UPHEAD_END;
    }
    if (p[0] == ' ' || p[0] == '\t') {
        *why = "folded header line (obs-fold)";
        return UPHEAD_BAD;
    }
    size_t i = 0;
    while (i < n && is_tchar((unsigned char)p[i])) {
        i++;
    }
    if (i == n) {
        *why = "header line without a colon";
        return UPHEAD_BAD;
    }
    if (p[i] != ':') {
        *why = (p[i] == ' ' || p[i] == '\t') ? "white space before a header's colon"
                                             : "invalid byte in a header name";
        return UPHEAD_BAD;
    }
    if (i == 0) {
        *why = "empty header name";
        return UPHEAD_BAD;
    }
    f->name = p;
    f->name_len = i;
    size_t v = i + 1, e = n;
    for (size_t k = v; k < n; k++) {
        if (!is_value_byte((unsigned char)p[k])) {
            *why = p[k] == '\r' ? "bare CR in a header value"
                   : p[k] == '\0' ? "NUL in a header value"
                                  : "control byte in a header value";
            return UPHEAD_BAD;
        }
    }
    while (v < e && (p[v] == ' ' || p[v] == '\t')) {
        v++;
    }
    while (e > v && (p[e - 1] == ' ' || p[e - 1] == '\t')) {
        e--;
    }
    f->value = p + v;
    f->value_len = e - v;
    return UPHEAD_FIELD;
}

int64_t
uphead_length(const struct http_header *h, size_t n)
{
    const char *cl = NULL;
    size_t ncl = 0;

    for (size_t i = 0; i < n; i++) {
        if (strcasecmp(h[i].name, "Transfer-Encoding") == 0) {
            return -1; /* whatever it says, curl decoded it: the length is not the upstream's */
        }
        if (strcasecmp(h[i].name, "Content-Length") == 0) {
            cl = h[i].value;
            ncl++;
        }
    }
    if (ncl != 1 || !cl[0]) {
        return -1;
    }
    int64_t v = 0;
    for (const char *p = cl; *p; p++) {
        if (*p < '0' || *p > '9' || p - cl >= 18) {
            return -1;
        }
        v = v * 10 + (*p - '0');
    }
    return v;
}

bool
uphead_encoded(const struct http_header *h, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (strcasecmp(h[i].name, "Content-Encoding") != 0) {
            continue;
        }
        for (const char *p = h[i].value; *p;) {
            p += strspn(p, ", \t");
            size_t tl = strcspn(p, ", \t");
            if (tl > 0 && !(tl == 8 && strncasecmp(p, "identity", 8) == 0)) {
                return true;
            }
            p += tl;
        }
    }
    return false;
}
