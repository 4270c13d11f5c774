#!/usr/bin/env python3
"""
run: start a fake upstream and a dsgate (tests/integration/harness.py), run
the openai-SDK client test (test.mjs) against them with DSGATE_URL and
FAKE_URL set, stop both, and print the PASS/FAIL lines plus one combined
`RESULT passed=N failed=N` line for tests/run.sh.  test_cache.mjs runs
against a second dsgate with the cache on; test_keepalive.mjs against two
more: keepalive {after: 1s, every: 1s} (DSGATE_URL) and keepalive off
(DSGATE_NOKA_URL).  test_anthropic.mjs (the Anthropic SDK) runs against two
dsgates whose upstream takes the Anthropic dialect: one with the cache and
retries on (DSGATE_ANTHROPIC_URL), one with a queue of one and a short
max_wait (DSGATE_ANTHROPIC_QUEUE_URL).  test_reasoning_tools.mjs (LangChain)
runs straight against the fake, through the plain dsgate (DSGATE_URL) and
through one with compat: {reasoning_content: restore} (DSGATE_COMPAT_URL).
A dsgate that does not start leaves its URL unset and says why in
DSGATE_*_NOTE: the tests that need it fail with that reason, the others run.
"""

import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness as H                                             # noqa: E402

NODE_TIMEOUT = 180


def run_node(run, script, d, fake, extra_env=None):
    """Run tests/clients/SCRIPT against dsgate D (None: none as DSGATE_URL);
    add its results to RUN."""
    env = dict(os.environ)
    if d is not None:
        env["DSGATE_URL"] = "http://127.0.0.1:%d/v1" % d.port
    env["FAKE_URL"] = fake.url
    env.update(extra_env or {})
    for k in list(env):
        if k.startswith(("OPENAI_", "ANTHROPIC_", "LANGCHAIN_", "LANGSMITH_")):
            env.pop(k, None)
    seen_result = False
    try:
        p = subprocess.Popen(["node", script], cwd=HERE, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        H._procs.append(p)
        try:
            out, _ = p.communicate(timeout=NODE_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            run.fail("clients_node", "%s did not finish within %ds" % (script, NODE_TIMEOUT))
        for line in out.decode("utf-8", "replace").splitlines():
            m = re.match(r"^RESULT passed=(\d+) failed=(\d+)\s*$", line)
            if m:
                run.passed += int(m.group(1))
                run.failed += int(m.group(2))
                seen_result = True
            else:
                print(line, flush=True)
        if not seen_result:
            run.fail("clients_node", "%s exited %s without a RESULT line" % (script, p.returncode))
        elif p.returncode != 0 and run.failed == 0:
            run.fail("clients_node", "%s exited %s" % (script, p.returncode))
    except OSError as e:
        run.fail("clients_node", "cannot run node: %s" % e)


def clean_exit(run, name, d):
    """Stop dsgate D: exit 0, no sanitizer report in its log."""
    rc = d.stop(15.0)
    log = d.log_text()
    bad = [p for p in ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer") if p in log]
    if bad or rc != 0:
        run.fail(name, "exit %s, %s in %s" % (rc, bad, d.log_path))
    else:
        run.ok(name)


def run_keepalive(run, fake):
    """test_keepalive.mjs: a dsgate with keepalive {after: 1s, every: 1s},
    another with keepalive off, the same fake behind both."""
    ds = []
    try:
        for tag, ka in (("clients-ka", "{after: 1s, every: 1s}"), ("clients-noka", "{after: 0s}")):
            ds.append(H.Dsgate(tag=tag, upstream_url=fake.url,
                               api_key_env="DSGATE_IT_UNSET_KEY_VARIABLE",
                               extra="keepalive: %s" % ka))
    except Exception as e:
        run.fail("clients_keepalive_setup", e)
        for d in ds:
            d.stop(15.0)
        return
    run_node(run, "test_keepalive.mjs", ds[0], fake,
             {"DSGATE_NOKA_URL": "http://127.0.0.1:%d/v1" % ds[1].port})
    clean_exit(run, "clients_keepalive_dsgate_clean_exit", ds[0])
    clean_exit(run, "clients_noka_dsgate_clean_exit", ds[1])


def anthropic_config(port, fake, queue=False):
    """A dsgate whose one upstream, FAKE, takes both dialects.  QUEUE: one
    request at a time toward it, a queue of one, max_wait 800ms, no
    keep-alives (so that dsgate's own 429 and 504 reach the client as
    statuses); else the cache (default paths) and 3 quick attempts."""
    lines = [
        "listen: 127.0.0.1:%d" % port,
        "upstreams:",
        "  - name: fake",
        "    url: %s" % H.yaml_quote(fake.url),
        "    api_key_env: DSGATE_IT_UNSET_KEY_VARIABLE",
        "    max_inflight: %d" % (1 if queue else 16),
        "    adaptive: false",
        "    timeouts: {connect: 2s, first_data: 30s, idle: 30s, total: 0}",
    ]
    d = H.dialects_line()
    if d:
        lines.append(d)
    if queue:
        lines += ["queue: {max_queued: 1, max_wait: 800ms}", "keepalive: {after: 0s}",
                  "retry: {max_attempts: 1}", "cache: {enabled: false}"]
    else:
        lines += ["retry: {max_attempts: 3, base: 50ms, cap: 200ms}", "cache: {enabled: true}"]
    lines += ["shutdown_timeout: 3s", "log: {level: info, format: json}"]
    return "\n".join(lines) + "\n"


def start_or_note(tag, text):
    """(dsgate, "") or (None, why it did not start)."""
    try:
        port = H.free_port()
        return H.Dsgate(config_text=text(port), tag=tag, port=port), ""
    except Exception as e:                          # noqa: BLE001
        why = str(e).strip().splitlines()
        ok, msg = H.config_accepted(text(1))
        return None, "dsgate did not start: %s" % (msg if not ok else (why[0] if why else e))


def run_anthropic(run, fake):
    """test_anthropic.mjs against the two Anthropic dsgates."""
    d, why = start_or_note("clients-anth", lambda p: anthropic_config(p, fake))
    dq, whyq = start_or_note("clients-anth-queue", lambda p: anthropic_config(p, fake, queue=True))
    env = {"DSGATE_ANTHROPIC_NOTE": "; ".join(w for w in (why, whyq) if w) or "not set"}
    if d:
        env["DSGATE_ANTHROPIC_URL"] = "http://127.0.0.1:%d/anthropic" % d.port
    if dq:
        env["DSGATE_ANTHROPIC_QUEUE_URL"] = "http://127.0.0.1:%d/anthropic" % dq.port
    run_node(run, "test_anthropic.mjs", None, fake, env)
    for name, x in (("clients_anthropic_dsgate_clean_exit", d),
                    ("clients_anthropic_queue_dsgate_clean_exit", dq)):
        if x:
            clean_exit(run, name, x)


def run_reasoning(run, fake, plain):
    """test_reasoning_tools.mjs: LangChain's tool loop against a thinking
    model, straight to FAKE, through PLAIN and through a compat dsgate."""
    def text(port):
        return H.make_config(port, fake.url, api_key_env="DSGATE_IT_UNSET_KEY_VARIABLE",
                             extra="compat: {reasoning_content: restore}")
    d, why = start_or_note("clients-compat", text)
    env = {"DSGATE_COMPAT_NOTE": why or "not set"}
    if d:
        env["DSGATE_COMPAT_URL"] = "http://127.0.0.1:%d/v1" % d.port
    run_node(run, "test_reasoning_tools.mjs", plain, fake, env)
    if d:
        clean_exit(run, "clients_compat_dsgate_clean_exit", d)


def main():
    run = H.Runner("clients")
    try:
        fake = H.Fake(name="clients")
        d = H.Dsgate(tag="clients", upstream_url=fake.url,
                     api_key_env="DSGATE_IT_UNSET_KEY_VARIABLE")
    except Exception as e:
        run.fail("clients_setup", e)
        return run.finish()
    run_node(run, "test.mjs", d, fake)
    # the cache through the SDK: a second dsgate with the cache on
    try:
        dc = H.Dsgate(tag="clients-cache", upstream_url=fake.url, cache=True,
                      api_key_env="DSGATE_IT_UNSET_KEY_VARIABLE")
    except Exception as e:
        run.fail("clients_cache_setup", e)
        dc = None
    if dc:
        run_node(run, "test_cache.mjs", dc, fake)
        rc = dc.stop(15.0)
        log = dc.log_text()
        bad = [p for p in ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer")
               if p in log]
        if bad or rc != 0:
            run.fail("clients_cache_dsgate_clean_exit",
                     "exit %s, %s in %s" % (rc, bad, dc.log_path))
        else:
            run.ok("clients_cache_dsgate_clean_exit")
    run_keepalive(run, fake)
    run_anthropic(run, fake)
    run_reasoning(run, fake, d)
    rc = d.stop(15.0)
    log = d.log_text()
    bad = [p for p in ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer") if p in log]
    if bad or rc != 0:
        run.fail("clients_dsgate_clean_exit", "exit %s, %s in %s" % (rc, bad, d.log_path))
    else:
        run.ok("clients_dsgate_clean_exit")
    fake.stop()
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
