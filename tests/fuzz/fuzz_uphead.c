/*
 * fuzz_uphead: the checks on an upstream's response head (uphead.c), the
 * untrusted input whose lines dsgate forwards to its clients.
 *
 * The input is split into lines the way libcurl hands them to the header
 * callback (each with its "\n"); every line is checked.  A line accepted
 * as a field must give a name of token bytes only and a value without
 * CR, LF, NUL or other controls and without surrounding white space, both
 * inside the line.  The accepted fields then go through uphead_length and
 * uphead_encoded: a length is -1 or what the one Content-Length says, and
 * never comes with a Transfer-Encoding.
 */
#include <stdint.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http.h"
#include "uphead.h"

#define MAX_FIELDS 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int
is_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct http_header h[MAX_FIELDS];
    char *store[MAX_FIELDS * 2];
    size_t n = 0;
    const char *p = (const char *)data, *end = p + size;

    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t len = nl ? (size_t)(nl - p) + 1 : (size_t)(end - p);
        /* a copy of exactly LEN bytes: ASan sees any read past the line */
        char *line = malloc(len ? len : 1);
        if (!line) {
            break;
        }
        memcpy(line, p, len);
        struct uphead_field f;
        const char *why = NULL;
        enum uphead_kind k = uphead_line(line, len, &f, &why);
        if (k == UPHEAD_BAD && (!why || !*why)) {
            fprintf(stderr, "a bad line without a reason\n");
            abort();
        }
        if (k == UPHEAD_END && !(len == 1 || (len == 2 && line[0] == '\r'))) {
            fprintf(stderr, "a %zu-byte line taken for the end of the head\n", len);
            abort();
        }
        if (k == UPHEAD_FIELD) {
            if (f.name != line || f.name_len == 0 || f.value < line ||
                f.value + f.value_len > line + len) {
                fprintf(stderr, "field outside its line\n");
                abort();
            }
            for (size_t i = 0; i < f.name_len; i++) {
                if (!is_tchar((unsigned char)f.name[i])) {
                    fprintf(stderr, "non-token byte 0x%02x in an accepted name\n",
                            (unsigned char)f.name[i]);
                    abort();
                }
            }
            for (size_t i = 0; i < f.value_len; i++) {
                unsigned char c = (unsigned char)f.value[i];
                if ((c < 0x20 && c != '\t') || c == 0x7f) {
                    fprintf(stderr, "control byte 0x%02x in an accepted value\n", c);
                    abort();
                }
            }
            if (f.value_len && (f.value[0] == ' ' || f.value[0] == '\t' ||
                                f.value[f.value_len - 1] == ' ' ||
                                f.value[f.value_len - 1] == '\t')) {
                fprintf(stderr, "white space around an accepted value\n");
                abort();
            }
            if (n < MAX_FIELDS) {
                char *nm = strndup(f.name, f.name_len);
                char *v = strndup(f.value, f.value_len);
                if (nm && v) {
                    h[n].name = nm;
                    h[n].value = v;
                    store[2 * n] = nm;
                    store[2 * n + 1] = v;
                    n++;
                } else {
                    free(nm);
                    free(v);
                }
            }
        }
        free(line);
        p += len;
    }

    int64_t clen = uphead_length(h, n);
    int te = 0;
    for (size_t i = 0; i < n; i++) {
        if (strcasecmp(h[i].name, "Transfer-Encoding") == 0) {
            te = 1;
        }
    }
    const char *why = NULL;
    bool chunked = false;
    bool framing = uphead_framing_ok(h, n, &chunked, &why);
    if (framing && chunked != (te == 1)) {
        fprintf(stderr, "chunked %d with Transfer-Encoding %d\n", chunked, te);
        abort();
    }
    if (clen < -1 || (clen >= 0 && (te || !framing))) {
        fprintf(stderr, "length %lld with Transfer-Encoding %d, framing ok %d\n",
                (long long)clen, te, framing);
        abort();
    }
    if (clen >= 0) {
        /* every Content-Length names that number, alone or in a list of it */
        for (size_t i = 0; i < n; i++) {
            if (strcasecmp(h[i].name, "Content-Length") != 0) {
                continue;
            }
            for (const char *c = h[i].value; *c;) {
                c += strspn(c, " \t,");
                if (!*c) {
                    break;
                }
                char *end;
                long long v = strtoll(c, &end, 10);
                if (end == c || v != clen) {
                    fprintf(stderr, "length %lld from Content-Length \"%s\"\n", (long long)clen,
                            h[i].value);
                    abort();
                }
                c = end;
            }
        }
    }
    (void)uphead_encoded(h, n);
    /* the whole input as a chunked body, in two pieces: never more out than in */
    struct uphead_chunks ck;
    uphead_chunks_init(&ck);
    char *out = malloc(size ? size : 1);
    if (out) {
        const char *cwhy = NULL;
        size_t half = size / 2;
        long a = uphead_chunks_feed(&ck, (const char *)data, half, out, &cwhy);
        long b = a < 0 ? -1
                       : uphead_chunks_feed(&ck, (const char *)data + half, size - half, out,
                                            &cwhy);
        if (a > (long)half || b > (long)(size - half) || ((a < 0 || b < 0) && !cwhy)) {
            fprintf(stderr, "chunk decoder wrote %ld + %ld from %zu bytes\n", a, b, size);
            abort();
        }
        free(out);
    }
    for (size_t i = 0; i < 2 * n; i++) {
        free(store[i]);
    }
    return 0;
}
