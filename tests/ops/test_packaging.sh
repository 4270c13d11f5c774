#!/usr/bin/env bash
# tests/ops/test_packaging.sh: the packaging of dsgate, checked without
# systemd running, without a Docker engine and without a cluster.
#
#   - systemd/dsgate.service: the directives the issue asks for;
#     `systemd-analyze verify` with @BINDIR@/@SYSCONF@ filled in as
#     `make install` does; `systemd-analyze security --offline=true` with an
#     overall exposure of at most 2.0;
#   - `make install DESTDIR=...` puts the binary, the config and the unit in
#     place (and keeps an edited config on a second install);
#   - Dockerfile: every package of its `apt-get install` lines exists in
#     Debian 12 (apt-cache); the runtime stage's packages, with their
#     dependencies, provide every library `ldd build/dsgate` lists (mapped to
#     packages with dpkg -S); multi-stage layout, non-root user, EXPOSE,
#     HEALTHCHECK with `dsgate --health`, .dockerignore;
#   - conf/kubernetes/*.yaml: parses (PyYAML when present), has the Secret,
#     ConfigMap (whose dsgate.yaml passes --check-config), Deployment with
#     the dsgate sidecar and its probes, and an HPA that can work.
#
# Prints `PASS name` / `FAIL name: reason` / `SKIP name: reason` lines and,
# last, `RESULT passed=N failed=N` (skips count as neither).  Needs
# build/dsgate (built with `make build/dsgate` when missing).

set -u
cd "$(dirname "$0")/../.." || exit 2
ROOT=$PWD
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

PASSED=0
FAILED=0
TMP=$(mktemp -d "${TMPDIR:-/tmp}/dsgate-pkg-XXXXXX")
trap 'rm -rf "$TMP"' EXIT

pass() { echo "PASS $1"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL $1: $2"; FAILED=$((FAILED + 1)); }
skip() { echo "SKIP $1: $2"; }

UNIT=systemd/dsgate.service
BIN=build/dsgate

if [ ! -x "$BIN" ]; then
    echo "# $BIN missing: make build/dsgate"
    make --no-print-directory build/dsgate >"$TMP/make-build.log" 2>&1 || {
        tail -n 20 "$TMP/make-build.log"
    }
fi

# ---------------------------------------------------------------- systemd

t_unit_directives() {
    local name=unit_directives missing=() d
    for d in '^Type=notify$' '^ExecStartPre=@BINDIR@/dsgate --check-config ' \
             '^ExecReload=@BINDIR@/dsgate --check-config ' '^ExecReload=.*kill -HUP \$MAINPID' \
             '^DynamicUser=yes$' '^EnvironmentFile=-@SYSCONF@/dsgate/env$' \
             '^NoNewPrivileges=yes$' '^ProtectSystem=strict$' '^ProtectHome=yes$' \
             '^PrivateTmp=yes$' '^PrivateDevices=yes$' '^RestrictAddressFamilies=' \
             '^SystemCallFilter=@system-service$' '^CapabilityBoundingSet=$' \
             '^MemoryDenyWriteExecute=yes$'; do
        grep -Eq "$d" "$UNIT" || missing+=("$d")
    done
    # [Service] settings are commented: every block of directives (lines
    # between blank lines) starts with a comment
    local uncommented
    uncommented=$(awk '
        /^[[:space:]]*$/ { prev = "blank"; next }
        /^[[:space:]]*[#;]/ { prev = "comment"; next }
        /^\[/ { sect = $0; prev = "section"; next }
        sect == "[Service]" { if (prev == "blank" || prev == "section") print NR": "$0 }
        { prev = "directive" }' "$UNIT")
    if [ ${#missing[@]} -gt 0 ]; then
        fail $name "missing in $UNIT: ${missing[*]}"
    elif [ -n "$uncommented" ]; then
        fail $name "directive blocks without a comment: $(echo "$uncommented" | tr '\n' ';')"
    else
        pass $name
    fi
}

# The unit as `make install` writes it (same sed), pointing at this tree's
# binary so that verify finds an executable.
unit_for_analyze() {
    mkdir -p "$TMP/unit/etc/dsgate"
    cp conf/dsgate.yaml "$TMP/unit/etc/dsgate/dsgate.yaml"
    sed "s|@BINDIR@|$ROOT/build|g; s|@SYSCONF@|$TMP/unit/etc|g" "$UNIT" >"$TMP/unit/dsgate.service"
    echo "$TMP/unit/dsgate.service"
}

t_systemd_verify() {
    local name=systemd_analyze_verify
    if ! command -v systemd-analyze >/dev/null 2>&1; then
        skip $name "systemd-analyze not installed (Debian package systemd)"
        return
    fi
    if [ ! -x "$BIN" ]; then
        fail $name "$BIN not built"
        return
    fi
    local u out rc
    u=$(unit_for_analyze)
    out=$(cd "$TMP/unit" && systemd-analyze verify "$u" 2>&1)
    rc=$?
    # verify exits 0 on unknown keys and bad values: any word about the unit fails
    if [ $rc -ne 0 ] || printf '%s' "$out" | grep -q "dsgate.service"; then
        fail $name "exit $rc: $(printf '%s' "$out" | sort -u | tr '\n' ';' | cut -c1-800)"
    else
        pass $name
    fi
}

t_systemd_security() {
    local name=systemd_analyze_security
    if ! command -v systemd-analyze >/dev/null 2>&1; then
        skip $name "systemd-analyze not installed (Debian package systemd)"
        return
    fi
    local u out level
    u=$(unit_for_analyze)
    out=$(cd "$TMP/unit" && systemd-analyze security --offline=true --no-pager "$u" 2>&1)
    if printf '%s' "$out" | grep -q "Unknown option\|unrecognized option"; then
        skip $name "this systemd-analyze has no --offline (systemd >= 250 needed)"
        return
    fi
    level=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: *\([0-9][0-9.]*\).*/\1/p' | tail -n 1)
    if [ -z "$level" ]; then
        fail $name "no 'Overall exposure level' line: $(printf '%s' "$out" | tail -n 5 | tr '\n' ';')"
    elif awk -v l="$level" 'BEGIN { exit !(l <= 2.0) }'; then
        pass "$name (exposure $level)"
    else
        fail $name "exposure $level > 2.0; worst settings: $(printf '%s\n' "$out" | grep '^✗' | head -n 8 | tr -s ' ' | tr '\n' ';')"
    fi
}

# ---------------------------------------------------------------- make install

t_make_install() {
    local name=make_install D out problems=()
    D=$(mktemp -d "$TMP/destdir-XXXXXX")
    if ! make --no-print-directory install DESTDIR="$D" >"$TMP/install.log" 2>&1; then
        fail $name "make install DESTDIR=$D failed: $(tail -n 5 "$TMP/install.log" | tr '\n' ';')"
        return
    fi
    local bin=$D/usr/local/bin/dsgate conf=$D/etc/dsgate/dsgate.yaml unit=$D/lib/systemd/system/dsgate.service
    [ -x "$bin" ] || problems+=("no executable /usr/local/bin/dsgate")
    [ -f "$conf" ] || problems+=("no /etc/dsgate/dsgate.yaml")
    [ -f "$unit" ] || problems+=("no /lib/systemd/system/dsgate.service")
    if [ -f "$unit" ]; then
        grep -q '@[A-Z]*@' "$unit" && problems+=("placeholders left in the unit: $(grep -o '@[A-Z]*@' "$unit" | sort -u | tr '\n' ' ')")
        grep -q '^ExecStart=/usr/local/bin/dsgate -c /etc/dsgate/dsgate.yaml$' "$unit" ||
            problems+=("ExecStart is not /usr/local/bin/dsgate -c /etc/dsgate/dsgate.yaml")
        [ "$(stat -c %a "$unit")" = 644 ] || problems+=("unit mode $(stat -c %a "$unit")")
    fi
    if [ -x "$bin" ] && [ -f "$conf" ]; then
        out=$("$bin" --check-config -c "$conf" 2>&1) || problems+=("installed config does not validate: $out")
        cmp -s "$bin" "$BIN" || problems+=("installed binary differs from $BIN")
        # a second install keeps an edited configuration
        echo "# edited by the admin" >>"$conf"
        make --no-print-directory install DESTDIR="$D" >>"$TMP/install.log" 2>&1 ||
            problems+=("second make install failed")
        grep -q "edited by the admin" "$conf" || problems+=("a second install overwrote the edited config")
    fi
    if [ ${#problems[@]} -gt 0 ]; then
        fail $name "$(printf '%s; ' "${problems[@]}")"
    else
        pass $name
    fi
}

# ---------------------------------------------------------------- Dockerfile

# The Dockerfile with continuation lines joined, one instruction per line,
# prefixed by the stage number (0, 1, ...).
docker_instructions() {
    awk '
        /^[[:space:]]*#/ { next }
        { line = line $0 }
        /\\[[:space:]]*$/ { sub(/\\[[:space:]]*$/, " ", line); next }
        { if (line ~ /^[[:space:]]*FROM[[:space:]]/) stage++
          if (line !~ /^[[:space:]]*$/) print stage - 1 "\t" line
          line = "" }' Dockerfile
}

# Package names of the `apt-get install` commands of stage $1 (all when empty).
docker_packages() {
    docker_instructions | awk -F'\t' -v s="${1:-}" '
        (s == "" || $1 == s) && $2 ~ /apt-get[^&;|]* install/ {
            n = split($2, cmds, /&&|;|\|\|/)
            for (i = 1; i <= n; i++) {
                if (cmds[i] !~ /apt-get[^&;|]* install/) continue
                m = split(cmds[i], w, /[[:space:]]+/); on = 0
                for (j = 1; j <= m; j++) {
                    if (w[j] == "install") { on = 1; continue }
                    if (on && w[j] != "" && w[j] !~ /^-/) print w[j]
                }
            }
        }' | sort -u
}

APT_OK=""
apt_ready() {    # 0 when apt-cache knows Debian 12's packages
    if [ -z "$APT_OK" ]; then
        APT_OK=no
        if ! command -v apt-cache >/dev/null 2>&1; then
            APT_WHY="apt-cache not available"
        elif ! grep -q '^VERSION_ID="12"' /etc/os-release 2>/dev/null; then
            APT_WHY="this machine is not Debian 12, so its apt lists cannot answer for Debian 12"
        elif ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
            APT_WHY="apt lists are empty: run apt-get update first"
        else
            APT_OK=yes
        fi
    fi
    [ "$APT_OK" = yes ]
}

t_docker_packages_exist() {
    local name=docker_packages_exist_in_debian12 pkgs missing=() p
    if ! apt_ready; then
        skip $name "$APT_WHY"
        return
    fi
    pkgs=$(docker_packages)
    if [ -z "$pkgs" ]; then
        fail $name "no apt-get install line found in Dockerfile"
        return
    fi
    # one apt-cache call (each call reads every list): it prints the ones it knows
    local found
    found=$(apt-cache show --no-all-versions $pkgs 2>/dev/null | sed -n 's/^Package: //p' | sort -u)
    for p in $pkgs; do
        printf '%s\n' "$found" | grep -qx -- "$p" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        fail $name "not in Debian 12: ${missing[*]}"
    else
        pass "$name ($(echo $pkgs | wc -w) packages)"
    fi
}

# "LIB<TAB>PACKAGE" for each library file given, PACKAGE the Debian package
# that ships it (empty when none does); the file is looked up as given, as
# its real path, and with or without /usr (merged /usr), in one dpkg call.
pkgs_of_files() {
    local f r c cands=()
    for f in "$@"; do
        r=$(readlink -f "$f")
        cands+=("$f" "$r" "/usr$f" "${f#/usr}" "/usr$r" "${r#/usr}")
    done
    dpkg -S "${cands[@]}" 2>/dev/null |
        sed -n 's/^\([^:,]*\)\(:[a-z0-9]*\)\?\(, [^:]*\)\?: \(\/.*\)$/\4\t\1/p' >"$TMP/dpkg-S"
    for f in "$@"; do
        r=$(readlink -f "$f")
        local pkg=""
        for c in "$f" "$r" "/usr$f" "${f#/usr}" "/usr$r" "${r#/usr}"; do
            pkg=$(awk -F'\t' -v p="$c" '$1 == p { print $2; exit }' "$TMP/dpkg-S")
            [ -n "$pkg" ] && break
        done
        printf '%s\t%s\n' "$f" "$pkg"
    done
}

t_docker_runtime_libs() {
    local name=docker_runtime_libs_match_ldd stage pkgs closure lib pkg missing=() unknown=()
    if ! apt_ready; then
        skip $name "$APT_WHY"
        return
    fi
    if ! command -v dpkg >/dev/null 2>&1 || ! command -v ldd >/dev/null 2>&1; then
        skip $name "dpkg or ldd not available"
        return
    fi
    if [ ! -x "$BIN" ]; then
        fail $name "$BIN not built"
        return
    fi
    stage=$(docker_instructions | awk -F'\t' '$2 ~ /^[[:space:]]*FROM/ { s = $1 } END { print s }')
    pkgs=$(docker_packages "$stage")
    if [ -z "$pkgs" ]; then
        fail $name "the runtime stage (FROM number $((stage + 1))) installs no package"
        return
    fi
    # the listed packages and everything they depend on (virtuals in <> too)
    closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
                  --no-breaks --no-replaces --no-enhances $pkgs 2>/dev/null |
              sed -n 's/^[[:space:]]*\(|\?\(Pre\)\?Depends: \)\?<\?\([a-z0-9][a-z0-9.+-]*\)>\?$/\3/p' |
              sort -u)
    local libs
    libs=$(ldd "$BIN" | awk '/=>/ && $3 ~ /^\// { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }')
    while IFS=$'\t' read -r lib pkg; do
        if [ -z "$pkg" ]; then
            unknown+=("$lib")
        elif ! printf '%s\n' "$closure" | grep -qx -- "$pkg"; then
            missing+=("$(basename "$lib") ($pkg)")
        fi
    done < <(pkgs_of_files $libs)
    if [ ${#missing[@]} -gt 0 ]; then
        fail $name "runtime stage lacks: ${missing[*]}"
    elif [ ${#unknown[@]} -gt 0 ]; then
        fail $name "no Debian package ships: ${unknown[*]}"
    else
        # and nothing only a build needs
        local dev
        dev=$(printf '%s\n' $pkgs | grep -E -- '-dev$|^build-essential$|^gcc|^make$|^pkg-config$' | tr '\n' ' ')
        if [ -n "$dev" ]; then
            fail $name "runtime stage installs build packages: $dev"
        else
            pass "$name ($(ldd "$BIN" | grep -c '=>') libraries)"
        fi
    fi
}

t_docker_layout() {
    local name=docker_layout problems=() nfrom last build_pkgs p deb_build
    nfrom=$(grep -Ec '^[[:space:]]*FROM[[:space:]]' Dockerfile)
    [ "$nfrom" -ge 2 ] || problems+=("not multi-stage ($nfrom FROM)")
    grep -E '^[[:space:]]*FROM[[:space:]]' Dockerfile | grep -Evq 'debian:(12|bookworm)-slim' &&
        problems+=("a stage is not on debian:12-slim: $(grep -E '^[[:space:]]*FROM' Dockerfile | grep -Ev 'debian:(12|bookworm)-slim' | tr '\n' ' ')")
    last=$(awk '/^[[:space:]]*FROM[[:space:]]/ { buf = "" } { buf = buf $0 "\n" } END { printf "%s", buf }' Dockerfile)
    local user
    user=$(printf '%s' "$last" | sed -n 's/^[[:space:]]*USER[[:space:]]\+\([^[:space:]]*\).*/\1/p' | tail -n 1)
    case "$user" in
        "" | root | 0 | 0:*) problems+=("runtime stage runs as root (USER '$user')") ;;
    esac
    printf '%s' "$last" | grep -Eq '^[[:space:]]*EXPOSE[[:space:]]+8080' || problems+=("no EXPOSE 8080")
    printf '%s' "$last" | grep -Eq '^[[:space:]]*HEALTHCHECK.*(CMD|\\)' &&
        printf '%s' "$last" | grep -q -- '--health' || problems+=("no HEALTHCHECK with dsgate --health")
    printf '%s' "$last" | grep -Eq 'COPY[[:space:]]+--from=' || problems+=("runtime stage does not copy from the build stage")
    printf '%s' "$last" | grep -Eq 'DSGATE_LISTEN=0\.0\.0\.0:8080' || problems+=("DSGATE_LISTEN not set to 0.0.0.0:8080")
    # the build stage installs what `make deps` installs to build
    deb_build=$(awk '/^DEB_BUILD[ \t]*:=/ { on = 1 } on { l = l $0; if ($0 !~ /\\$/) { print l; exit } }' Makefile |
                sed 's/\\//g; s/^DEB_BUILD[[:space:]]*:=//')
    build_pkgs=$(docker_packages 0)
    for p in $deb_build; do
        printf '%s\n' "$build_pkgs" | grep -qx "$p" || problems+=("build stage lacks $p (Makefile DEB_BUILD)")
    done
    grep -q 'make .*build/dsgate\|make$\|make &&' Dockerfile || problems+=("build stage does not run make")
    if [ ! -f .dockerignore ]; then
        problems+=("no .dockerignore")
    else
        for p in build .git; do
            grep -Eq "^/?$p/?\$" .dockerignore || problems+=(".dockerignore does not exclude $p")
        done
    fi
    if [ ${#problems[@]} -gt 0 ]; then
        fail $name "$(printf '%s; ' "${problems[@]}")"
    else
        pass $name
    fi
}

# ---------------------------------------------------------------- Kubernetes

t_kubernetes() {
    local name=kubernetes_sidecar_yaml f=conf/kubernetes/dsgate-sidecar.yaml out
    if [ ! -f "$f" ]; then
        fail $name "$f missing"
        return
    fi
    if ! "$PY" -c 'import yaml' 2>/dev/null; then
        # minimal check without PyYAML: the kinds, the probes, no tabs
        local problems=() k
        for k in Deployment ConfigMap Secret HorizontalPodAutoscaler; do
            grep -Eq "^kind:[[:space:]]*${k}[[:space:]]*\$" "$f" || problems+=("no kind $k")
        done
        grep -q livenessProbe "$f" || problems+=("no livenessProbe")
        grep -q readinessProbe "$f" || problems+=("no readinessProbe")
        grep -q "$(printf '\t')" "$f" && problems+=("tab characters")
        if [ ${#problems[@]} -gt 0 ]; then
            fail $name "$(printf '%s; ' "${problems[@]}")"
        else
            pass "$name (minimal check: python3-yaml not installed)"
        fi
        return
    fi
    out=$("$PY" - "$f" "$BIN" "$TMP" <<'EOF'
import os, subprocess, sys, yaml
path, binary, tmp = sys.argv[1:4]
problems = []
try:
    docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
except yaml.YAMLError as e:
    print("does not parse: %s" % e)
    sys.exit(1)
by_kind = {}
for d in docs:
    if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
        problems.append("a document without kind/apiVersion")
        continue
    by_kind.setdefault(d["kind"], []).append(d)
for k in ("Deployment", "ConfigMap", "Secret", "HorizontalPodAutoscaler"):
    if k not in by_kind:
        problems.append("no %s" % k)
if problems:
    print("; ".join(problems))
    sys.exit(1)

dep = by_kind["Deployment"][0]
spec = dep["spec"]["template"]["spec"]
conts = spec.get("containers") or []
sel = dep["spec"].get("selector", {}).get("matchLabels", {})
labels = dep["spec"]["template"]["metadata"].get("labels", {})
if not sel or any(labels.get(k) != v for k, v in sel.items()):
    problems.append("Deployment selector does not match the pod labels")
ds = [c for c in conts if "dsgate" in (c.get("image", "") + c.get("name", ""))]
apps = [c for c in conts if c not in ds]
if len(ds) != 1 or not apps:
    problems.append("want one dsgate container beside at least one app container")
    print("; ".join(problems))
    sys.exit(1)
ds = ds[0]
ports = {p.get("name"): p.get("containerPort") for p in ds.get("ports") or []}

def probe_port(p):
    v = p["httpGet"]["port"]
    return ports.get(v) if isinstance(v, str) else v

for pn, want in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
    p = ds.get(pn)
    if not p or "httpGet" not in p:
        problems.append("dsgate has no %s httpGet" % pn)
    elif p["httpGet"].get("path") != want:
        problems.append("%s path %r (want %s)" % (pn, p["httpGet"].get("path"), want))
    elif probe_port(p) is None:
        problems.append("%s port %r is not a declared port" % (pn, p["httpGet"]["port"]))

# the ConfigMap holds a valid dsgate.yaml whose admin_listen is the probe port
cms = {c["metadata"]["name"]: c for c in by_kind["ConfigMap"]}
vol_cm = {}
for v in spec.get("volumes") or []:
    if "configMap" in v:
        vol_cm[v["name"]] = v["configMap"]["name"]
mounted = [m for m in ds.get("volumeMounts") or [] if m["name"] in vol_cm]
if not mounted:
    problems.append("dsgate mounts no ConfigMap")
else:
    cm = cms.get(vol_cm[mounted[0]["name"]])
    if cm is None:
        problems.append("mounted ConfigMap %r not defined" % vol_cm[mounted[0]["name"]])
    else:
        files = cm.get("data") or {}
        args = ds.get("args") or []
        conf_path = args[args.index("-c") + 1] if "-c" in args else "/etc/dsgate/dsgate.yaml"
        fname = os.path.relpath(conf_path, mounted[0]["mountPath"])
        if fname not in files:
            problems.append("-c %s is not a file of the mounted ConfigMap (%s)"
                            % (conf_path, ", ".join(files)))
        else:
            text = files[fname]
            p = os.path.join(tmp, "k8s-dsgate.yaml")
            open(p, "w").write(text)
            if os.access(binary, os.X_OK):
                r = subprocess.run([binary, "--check-config", "-c", p], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
                if r.returncode != 0:
                    problems.append("ConfigMap dsgate.yaml does not validate: %s"
                                    % r.stdout.decode()[-400:].replace("\n", " "))
            cfg = yaml.safe_load(text) or {}
            admin = str(cfg.get("admin_listen") or "")
            if admin:
                if not admin.endswith(":%s" % probe_port(ds["livenessProbe"])):
                    problems.append("probes on port %s but admin_listen is %s"
                                    % (probe_port(ds["livenessProbe"]), admin))
                if admin.startswith("127.") or admin.startswith("localhost"):
                    problems.append("admin_listen %s is loopback: the kubelet cannot probe it"
                                    % admin)

# the key comes from the Secret
secrets = {s["metadata"]["name"]: s for s in by_kind["Secret"]}
refs = [e["valueFrom"]["secretKeyRef"] for e in ds.get("env") or []
        if isinstance(e.get("valueFrom"), dict) and "secretKeyRef" in e["valueFrom"]]
if not refs:
    problems.append("dsgate takes no key from a Secret")
for r in refs:
    s = secrets.get(r["name"])
    keys = set((s or {}).get("stringData", {}) or {}) | set((s or {}).get("data", {}) or {})
    if s is None or r["key"] not in keys:
        problems.append("secretKeyRef %s/%s not defined" % (r["name"], r["key"]))
for c in apps:
    for e in c.get("env") or []:
        if isinstance(e.get("valueFrom"), dict) and "secretKeyRef" in e["valueFrom"]:
            if e["valueFrom"]["secretKeyRef"]["name"] in secrets:
                problems.append("the app container sees the upstream key Secret")

# the HPA scales this Deployment; a Resource metric needs requests in every container
hpa = by_kind["HorizontalPodAutoscaler"][0]
tgt = hpa["spec"].get("scaleTargetRef", {})
if tgt.get("kind") != "Deployment" or tgt.get("name") != dep["metadata"]["name"]:
    problems.append("HPA scaleTargetRef %r is not the Deployment" % tgt)
for m in hpa["spec"].get("metrics") or []:
    if m.get("type") == "Resource":
        res = m["resource"]["name"]
        for c in conts:
            if res not in ((c.get("resources") or {}).get("requests") or {}):
                problems.append("HPA on %s utilization but container %r has no %s request "
                                "(the HPA cannot compute utilization)" % (res, c["name"], res))
print("; ".join(problems))
sys.exit(1 if problems else 0)
EOF
)
    if [ $? -eq 0 ]; then
        pass $name
    else
        fail $name "$out"
    fi
}

t_unit_directives
t_systemd_verify
t_systemd_security
t_make_install
t_docker_packages_exist
t_docker_runtime_libs
t_docker_layout
t_kubernetes

echo "RESULT passed=$PASSED failed=$FAILED"
[ "$FAILED" -eq 0 ]
