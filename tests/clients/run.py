#!/usr/bin/env python3
"""
run: start a fake upstream and a dsgate (tests/integration/harness.py), run
the openai-SDK client test (test.mjs) against them with DSGATE_URL and
FAKE_URL set, stop both, and print the PASS/FAIL lines plus one combined
`RESULT passed=N failed=N` line for tests/run.sh.  test_cache.mjs runs
against a second dsgate with the cache on; test_keepalive.mjs against two
more: keepalive {after: 1s, every: 1s} (DSGATE_URL) and keepalive off
(DSGATE_NOKA_URL).
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
    """Run tests/clients/SCRIPT against dsgate D; add its results to RUN."""
    env = dict(os.environ)
    env["DSGATE_URL"] = "http://127.0.0.1:%d/v1" % d.port
    env["FAKE_URL"] = fake.url
    env.update(extra_env or {})
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
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
