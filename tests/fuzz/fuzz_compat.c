/*
 * fuzz_compat: the reasoning restore's plan and splice, and the capture of
 * answers (compat.c).
 *
 * Input: byte 0 chooses a cut point, the rest is a request body (planned
 * and spliced) and an answer (captured as SSE and as a whole).  What must
 * hold: the targets lie inside the body in order, without overlap; a body
 * with a target was a valid JSON object and stays one after the splice;
 * taking the inserted bytes out gives the client's body back, byte for
 * byte; an answer fed in two pieces is read as when fed at once.
 *
 * compat.c's Redis tier is not linked: the store functions are stubs.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compat.h"
#include "jscan.h"
#include "store.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct store_get *
store_get_ns(struct store *s, const char *ns, const uint8_t key[CACHE_KEY_LEN], store_get_fn fn,
             void *arg)
{
    (void)s, (void)ns, (void)key, (void)fn, (void)arg;
    return NULL;
}

void
store_put_ns(struct store *s, const char *ns, const struct cache_entry *e, int64_t ttl_ms)
{
    (void)s, (void)ns, (void)e, (void)ttl_ms;
}

void
store_get_cancel(struct store_get *g)
{
    (void)g;
}

static void
plan_and_splice(const char *body, size_t len)
{
    static const char value[] = "\"r\\\"\\u00e9\"";
    static const char member[] = ",\"reasoning_content\":";
    struct compat_target *t;
    size_t nt, n, moff = len;
    const char *what;
    size_t at;

    if (compat_plan(body, len, &t, &nt) < 0) {
        return;
    }
    if (nt == 0) {
        return;
    }
    if (nt > COMPAT_MAX_TARGETS || jscan_object(body, len, &what, &at) != 0) {
        abort(); /* a target in what is not a JSON object */
    }
    for (size_t i = 0; i < nt; i++) {
        if (t[i].at + t[i].cut > len || (i > 0 && t[i].at < t[i - 1].at + t[i - 1].cut) ||
            t[i].nids == 0 || (t[i].cut && memcmp(body + t[i].at, "null", 4) != 0)) {
            abort();
        }
        t[i].value = strdup(value);
    }
    char *out = compat_splice(body, len, t, nt, &n, &moff);
    if (!out) {
        abort();
    }
    if (jscan_object(out, n, &what, &at) != 0) {
        fprintf(stderr, "spliced body is not JSON: %s at %zu\n", what, at);
        abort();
    }
    /* the inserted bytes out again: the client's body */
    char *back = malloc(len + 1);
    size_t o = 0, from = 0, bl = 0;
    for (size_t i = 0; i < nt; i++) {
        size_t keep = t[i].at - from;
        memcpy(back + bl, out + o, keep);
        bl += keep;
        o += keep;
        if (t[i].cut) {
            memcpy(back + bl, "null", 4);
            bl += 4;
        } else {
            if (memcmp(out + o, member, sizeof(member) - 1) != 0) {
                abort();
            }
            o += sizeof(member) - 1;
        }
        if (memcmp(out + o, value, sizeof(value) - 1) != 0) {
            abort();
        }
        o += sizeof(value) - 1;
        from = t[i].at + t[i].cut;
    }
    memcpy(back + bl, out + o, n - o);
    bl += n - o;
    if (bl != len || memcmp(back, body, len) != 0 || moff != n) {
        abort();
    }
    free(back);
    free(out);
    compat_targets_free(t, nt);
}

static char *
capture(bool sse, const char *p, size_t len, size_t cut)
{
    struct compat_capture c;

    compat_capture_init(&c, sse, 1024);
    compat_capture_feed(&c, p, cut);
    compat_capture_feed(&c, p + cut, len - cut);
    char *v = compat_capture_result(&c);
    compat_capture_free(&c);
    return v;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return 0;
    }
    const char *p = (const char *)data + 1;
    size_t n = size - 1, cut = n ? data[0] % (n + 1) : 0;

    plan_and_splice(p, n);
    for (int sse = 0; sse < 2; sse++) {
        char *a = capture(sse, p, n, 0), *b = capture(sse, p, n, cut);
        if ((a == NULL) != (b == NULL) || (a && strcmp(a, b) != 0)) {
            fprintf(stderr, "capture differs when cut at %zu (sse %d)\n", cut, sse);
            abort();
        }
        free(a);
        free(b);
    }
    return 0;
}
