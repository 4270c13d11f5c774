#!/usr/bin/env python3
"""
test_cli: dsgate's command line: --check-config on good and bad files,
--version, --help.  Output goes to $DSGATE_TEST_LOGDIR/dsgate-cli-*.log too,
so the sanitizer scan in tests/run.sh sees it.
"""

import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H                                             # noqa: E402
from harness import check                                       # noqa: E402

TMP = tempfile.mkdtemp(prefix="cli-", dir=H._tmp_root)

BAD = """\
listen: 127.0.0.1:18080
upstreams:
  - name: a
    url: http://127.0.0.1:9
    max_inflight: 0
no_such_key: 1
shutdown_timeout: soon
"""
# problems: line 5 upstreams[0].max_inflight (range), line 6 no_such_key
# (unknown), line 7 shutdown_timeout (bad duration)


def dsgate(*args, env=None):
    e = dict(os.environ)
    for k in ("DSGATE_LISTEN", "DSGATE_UPSTREAM", "DSGATE_REDIS_URL", "DEEPSEEK_API_KEY"):
        e.pop(k, None)
    e["ASAN_OPTIONS"] = H.ASAN_OPTIONS
    e["UBSAN_OPTIONS"] = H.UBSAN_OPTIONS
    e.update(env or {})
    p = subprocess.run([H.DSGATE] + list(args), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e, timeout=30)
    out = p.stdout.decode("utf-8", "replace")
    with open(os.path.join(H.LOGDIR, "dsgate-cli-%d.log" % H._next_seq()), "w") as f:
        f.write("$ dsgate %s\n%s" % (" ".join(args), out))
    return p.returncode, out


def write(name, text):
    path = os.path.join(TMP, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def t_check_bad():
    path = write("bad.yaml", BAD)
    rc, out = dsgate("--check-config", "-c", path)
    check(rc == 1, "exit %s (want 1); output %r", rc, out[-500:])
    missing = []
    for line, key in ((5, "max_inflight"), (6, "no_such_key"), (7, "shutdown_timeout")):
        ok = any(("bad.yaml:%d" % line) in l and key in l for l in out.splitlines())
        if not ok:
            missing.append("bad.yaml:%d ... %s" % (line, key))
    check(not missing, "not reported (file:line and key on one line): %s; output %r",
          missing, out[-800:])


def t_check_syntax_error():
    path = write("broken.yaml", "listen: 127.0.0.1:18080\nupstreams: [\n  - name: a\n")
    rc, out = dsgate("--check-config", "-c", path)
    check(rc == 1, "exit %s (want 1); output %r", rc, out[-500:])
    check("broken.yaml" in out, "file not named: %r", out[-500:])


def t_check_missing_file():
    rc, out = dsgate("--check-config", "-c", os.path.join(TMP, "does-not-exist.yaml"))
    check(rc != 0, "exit 0 for a missing file")
    check("does-not-exist.yaml" in out, "file not named: %r", out[-300:])


def t_check_good():
    path = write("good.yaml", H.make_config(H.free_port(), "http://127.0.0.1:9",
                                            api_key_env="DSGATE_IT_KEY"))
    rc, out = dsgate("--check-config", "-c", path)
    check(rc == 0, "exit %s; output %r", rc, out[-500:])


def t_check_repo_default():
    path = os.path.join(H.ROOT, "conf", "dsgate.yaml")
    check(os.path.exists(path), "conf/dsgate.yaml missing")
    rc, out = dsgate("--check-config", "-c", path)
    check(rc == 0, "exit %s; output %r", rc, out[-500:])


def t_version():
    rc, out = dsgate("--version")
    check(rc == 0, "exit %s", rc)
    check(any(ch.isdigit() for ch in out), "no version number in %r", out)


def t_help():
    rc, out = dsgate("--help")
    check(rc == 0, "exit %s", rc)
    for w in ("-c", "--check-config", "--version"):
        check(w in out, "%r not in --help output %r", w, out[:500])


def t_bad_option():
    rc, out = dsgate("--no-such-option")
    check(rc != 0, "exit 0 for an unknown option")


TESTS = [
    ("check_config_bad_file", t_check_bad),
    ("check_config_yaml_syntax_error", t_check_syntax_error),
    ("check_config_missing_file", t_check_missing_file),
    ("check_config_good_file", t_check_good),
    ("check_config_conf_dsgate_yaml", t_check_repo_default),
    ("version", t_version),
    ("help", t_help),
    ("unknown_option", t_bad_option),
]


def main():
    return H.main("test_cli", TESTS, require=[(H.DSGATE, H.DSGATE)])


if __name__ == "__main__":
    sys.exit(main())
