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

bool
uphead_status_line(const char *p, size_t len, bool h2)
{
    size_t n = len;

    if (n >= 2 && p[n - 2] == '\r' && p[n - 1] == '\n') {
        n -= 2;
    } else {
        return false;
    }
    /* HTTP/1.x SP 3DIGIT [SP reason]; libcurl writes "HTTP/2 200 " itself for HTTP/2 */
    size_t v = h2 ? 7 : 9;
    if (n < v + 3 || memcmp(p, h2 ? "HTTP/2 " : "HTTP/1.", h2 ? 7 : 7) != 0 ||
        (!h2 && ((p[7] != '0' && p[7] != '1') || p[8] != ' '))) {
        return false;
    }
    for (size_t i = v; i < v + 3; i++) {
        if (p[i] < '0' || p[i] > '9') {
            return false;
        }
    }
    if (n == v + 3) {
        return true;
    }
    if (p[v + 3] != ' ') {
        return false;
    }
    for (size_t i = v + 4; i < n; i++) {
        if (!is_value_byte((unsigned char)p[i])) {
            return false; /* a bare CR or a control byte in the reason */
        }
    }
    return true;
}

/* A Content-Length value: one number, or a list of the same number; -1 otherwise. */
static int64_t
length_value(const char *v)
{
    int64_t first = -1;

    for (const char *p = v;;) {
        p += strspn(p, " \t");
        size_t d = strspn(p, "0123456789");
        if (d == 0 || d > 18) {
            return -1;
        }
        int64_t x = 0;
        for (size_t i = 0; i < d; i++) {
            x = x * 10 + (p[i] - '0');
        }
        if (first >= 0 && x != first) {
            return -1;
        }
        first = x;
        p += d;
        p += strspn(p, " \t");
        if (*p == '\0') {
            return first;
        }
        if (*p++ != ',') {
            return -1;
        }
    }
}

bool
uphead_framing_ok(const struct http_header *h, size_t n, bool *chunked, const char **why)
{
    size_t nte = 0;
    int64_t cl = -2;

    for (size_t i = 0; i < n; i++) {
        if (strcasecmp(h[i].name, "Transfer-Encoding") == 0) {
            nte++;
            if (nte > 1 || strcasecmp(h[i].value, "chunked") != 0) {
                *why = "a Transfer-Encoding other than one chunked";
                return false;
            }
        } else if (strcasecmp(h[i].name, "Content-Length") == 0) {
            int64_t v = length_value(h[i].value);
            if (v < 0 || (cl >= 0 && v != cl)) {
                *why = "an invalid Content-Length";
                return false;
            }
            cl = v;
        }
    }
    *chunked = nte == 1;
    return true; /* with Transfer-Encoding any Content-Length is ignored (not forwarded) */
}

int64_t
uphead_length(const struct http_header *h, size_t n)
{
    int64_t cl = -1;

    for (size_t i = 0; i < n; i++) {
        if (strcasecmp(h[i].name, "Transfer-Encoding") == 0) {
            return -1; /* whatever it says, curl decoded it: the length is not the upstream's */
        }
        if (strcasecmp(h[i].name, "Content-Length") == 0) {
            int64_t v = length_value(h[i].value);
            if (v < 0 || (cl >= 0 && v != cl)) {
                return -1; /* not one number: uphead_framing_ok refuses the answer */
            }
            cl = v;
        }
    }
    return cl;
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

enum {
    CK_SIZE,
    CK_EXT,
    CK_SIZE_LF,
    CK_DATA,
    CK_DATA_CR,
    CK_DATA_LF,
    CK_TRAILER_START,
    CK_TRAILER,
    CK_TRAILER_LF,
    CK_FINAL_LF,
    CK_DONE
};

void
uphead_chunks_init(struct uphead_chunks *c)
{
    c->state = CK_SIZE;
    c->left = 0;
    c->ndig = 0;
    c->colon = false;
}

static int
hexdig(unsigned char b)
{
    return b >= '0' && b <= '9'   ? b - '0'
           : b >= 'a' && b <= 'f' ? b - 'a' + 10
           : b >= 'A' && b <= 'F' ? b - 'A' + 10
                                  : -1;
}

static bool
is_ctl(unsigned char b)
{
    return (b < 0x20 && b != '\t') || b == 0x7f;
}

long
uphead_chunks_feed(struct uphead_chunks *c, const char *raw, size_t len, char *out,
                   const char **why)
{
    size_t o = 0;

    for (size_t i = 0; i < len;) {
        unsigned char b = (unsigned char)raw[i];
        switch (c->state) {
        case CK_SIZE: {
            int d = hexdig(b);
            if (d >= 0) {
                if (++c->ndig > 15) {
                    *why = "chunk size too large";
                    return -1;
                }
                c->left = c->left * 16 + (uint64_t)d;
            } else if (c->ndig > 0 && b == ';') {
                c->state = CK_EXT;
            } else if (c->ndig > 0 && b == '\r') {
                c->state = CK_SIZE_LF;
            } else {
                *why = "invalid chunk size line";
                return -1;
            }
            i++;
            break;
        }
        case CK_EXT:
            if (b == '\r') {
                c->state = CK_SIZE_LF;
            } else if (is_ctl(b)) {
                *why = "control byte in a chunk extension";
                return -1;
            }
            i++;
            break;
        case CK_SIZE_LF:
            if (b != '\n') {
                *why = "bare CR in a chunk size line";
                return -1;
            }
            c->state = c->left == 0 ? CK_TRAILER_START : CK_DATA;
            i++;
            break;
        case CK_DATA: {
            size_t n = len - i;
            if (n > c->left) {
                n = (size_t)c->left;
            }
            memcpy(out + o, raw + i, n);
            o += n;
            i += n;
            c->left -= n;
            if (c->left == 0) {
                c->state = CK_DATA_CR;
            }
            break;
        }
        case CK_DATA_CR:
        case CK_DATA_LF:
            if (b != (c->state == CK_DATA_CR ? '\r' : '\n')) {
                *why = "chunk data not followed by CRLF";
                return -1;
            }
            if (c->state == CK_DATA_LF) {
                c->ndig = 0;
                c->left = 0;
            }
            c->state = c->state == CK_DATA_CR ? CK_DATA_LF : CK_SIZE;
            i++;
            break;
        case CK_TRAILER_START:
            if (b == '\r') {
                c->state = CK_FINAL_LF;
            } else if (is_tchar(b)) {
                c->state = CK_TRAILER;
                c->colon = false;
            } else {
                *why = "invalid trailer line";
                return -1;
            }
            i++;
            break;
        case CK_TRAILER:
            if (b == '\r') {
                if (!c->colon) {
                    *why = "trailer line without a colon";
                    return -1;
                }
                c->state = CK_TRAILER_LF;
            } else if (b == ':') {
                c->colon = true;
            } else if (is_ctl(b)) {
                *why = "control byte in a trailer line";
                return -1;
            }
            i++;
            break;
        case CK_TRAILER_LF:
        case CK_FINAL_LF:
            if (b != '\n') {
                *why = "bare CR in the chunked trailer";
                return -1;
            }
            c->state = c->state == CK_TRAILER_LF ? CK_TRAILER_START : CK_DONE;
            i++;
            break;
        default:
            *why = "data after the last chunk";
            return -1;
        }
    }
    return (long)o;
}

bool
uphead_chunks_done(const struct uphead_chunks *c)
{
    return c->state == CK_DONE;
}
