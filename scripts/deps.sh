#!/usr/bin/env bash
# deps.sh: the system parts that `make demo` and `make test` need (Debian/Ubuntu).
#
#   1. apt packages: mosquitto, postgresql, chromium, chromium-driver, systemd (systemd-analyze),
#      python3-venv, golang-go and golang-golang-x-mod-dev (the independent check of the log's
#      formats, tests/interop), gcc, libc6-dev, make, mosquitto-dev, libmosquitto-dev and libssl-dev
#      (the broker's plugin, deploy/mosquitto/odo_doors.c). As root, installs whatever is missing;
#      otherwise prints the one command that does and exits 1.
#   2. PostgreSQL for the tests at $ODO_TEST_PG (default postgresql://127.0.0.1:5432/test):
#      the server answering, a login role for the test user, the database, and password-less
#      connections from 127.0.0.1 for that role. As root, it starts or fixes what it must and
#      says what it changed; otherwise it says what is wrong and exits 1.
#   3. The broker's plugin installed where deploy/mosquitto/odoledger.conf loads it
#      (/usr/local/lib/odoledger/odo_doors.so): as root, built and installed when missing or older
#      than its source; otherwise it prints the command (the tests build their own copy).
#
# Idempotent: on a machine that has everything it changes nothing.
set -euo pipefail

PACKAGES=(mosquitto postgresql chromium chromium-driver systemd python3-venv golang-go golang-golang-x-mod-dev
    gcc libc6-dev make mosquitto-dev libmosquitto-dev libssl-dev)
PG_URL=${ODO_TEST_PG:-postgresql://127.0.0.1:5432/test}

say() { echo "deps: $*"; }
fail() { echo "deps: $*" >&2; exit 1; }
is_root() { [[ $(id -u) -eq 0 ]]; }

installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

ensure_packages() {
    command -v dpkg-query >/dev/null || fail "this script knows Debian and Ubuntu (dpkg, apt-get) only"
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        say "apt packages present: ${PACKAGES[*]}"
        return
    fi
    if ! is_root; then
        echo "deps: missing apt packages: ${missing[*]}; install them with:" >&2
        echo "    sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    say "installing missing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}" </dev/null
    for p in "${missing[@]}"; do
        installed "$p" || fail "apt-get did not install $p"
    done
}

# --- PostgreSQL ---------------------------------------------------------------------------------

PG_USER="" PG_PASS="" PG_HOST="" PG_PORT="" PG_DB=""

urldecode() { local s=$1; printf '%b' "${s//%/\\x}"; }

parse_url() {
    local re='^postgres(ql)?://(([^:@/]+)(:([^@/]*))?@)?(\[[^]]*\]|[^:/?]*)(:([0-9]+))?/([^?]+)(\?.*)?$'
    [[ $PG_URL =~ $re ]] || fail "ODO_TEST_PG='$PG_URL' is not postgresql://[user[:password]@]host[:port]/database"
    # Under `sudo make deps` the tests will run as the user who typed it, not as root.
    PG_USER=$(urldecode "${BASH_REMATCH[3]:-${SUDO_USER:-$(id -un)}}")
    PG_PASS=$(urldecode "${BASH_REMATCH[5]}")
    PG_HOST=${BASH_REMATCH[6]:-127.0.0.1}
    PG_PORT=${BASH_REMATCH[8]:-5432}
    PG_DB=$(urldecode "${BASH_REMATCH[9]}")
}

is_local() { [[ $PG_HOST == 127.0.0.1 || $PG_HOST == localhost || $PG_HOST == "[::1]" ]]; }

answering() { pg_isready -q -h "${PG_HOST//[\[\]]/}" -p "$PG_PORT" -t 3; }

# try_connect: connect as the test role, without ever prompting; the error text on failure
try_connect() {
    PGCONNECT_TIMEOUT=5 PGUSER=$PG_USER psql "$PG_URL" -w -X -A -t -q -v ON_ERROR_STOP=1 2>&1 <<'SQL'
BEGIN;
CREATE SCHEMA odo_deps_probe;
ROLLBACK;
SQL
}

# pg_admin: run SQL from stdin as the postgres superuser, over the local socket
pg_admin() {
    runuser -u postgres -- psql -X -A -t -q -v ON_ERROR_STOP=1 -p "$PG_PORT" "$@"
}

need_root_for() {
    is_root && return 0
    echo "deps: PostgreSQL for the tests: $1" >&2
    echo "    fix it with: sudo make deps   (or point ODO_TEST_PG at a server that works)" >&2
    exit 1
}

start_server() {
    need_root_for "nothing answers on $PG_HOST:$PG_PORT"
    local ver="" cluster="" v c p
    while read -r v c p _; do
        if [[ $p == "$PG_PORT" ]]; then ver=$v cluster=$c; fi
    done < <(pg_lsclusters -h 2>/dev/null || true)
    if [[ -z $ver ]]; then
        ver=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)
        [[ -n $ver ]] || fail "no PostgreSQL server version under /usr/lib/postgresql"
        if [[ -d /etc/postgresql/$ver/main ]]; then
            fail "cluster $ver/main exists but is not on port $PG_PORT: set ODO_TEST_PG to its port"
        fi
        say "creating PostgreSQL cluster $ver/main on port $PG_PORT"
        pg_createcluster "$ver" main --port "$PG_PORT" >/dev/null
        cluster=main
    fi
    say "starting PostgreSQL $ver/$cluster (pg_ctlcluster --skip-systemctl-redirect $ver $cluster start)"
    pg_ctlcluster --skip-systemctl-redirect "$ver" "$cluster" start
    local i
    for i in $(seq 1 30); do
        answering && return 0
        sleep 1
    done
    fail "PostgreSQL $ver/$cluster did not answer on $PG_HOST:$PG_PORT within 30 s"
}

ensure_role_and_db() {
    if [[ -z $(pg_admin -v r="$PG_USER" <<<"SELECT 1 FROM pg_roles WHERE rolname = :'r'") ]]; then
        if [[ -n $PG_PASS ]]; then
            say "creating PostgreSQL role \"$PG_USER\" (LOGIN CREATEDB, with the password from ODO_TEST_PG)"
            pg_admin -v r="$PG_USER" -v p="$PG_PASS" <<<"CREATE ROLE :\"r\" LOGIN CREATEDB PASSWORD :'p'"
        else
            say "creating PostgreSQL role \"$PG_USER\" (LOGIN CREATEDB)"
            pg_admin -v r="$PG_USER" <<<'CREATE ROLE :"r" LOGIN CREATEDB'
        fi
    fi
    if [[ -z $(pg_admin -v d="$PG_DB" <<<"SELECT 1 FROM pg_database WHERE datname = :'d'") ]]; then
        say "creating PostgreSQL database \"$PG_DB\" owned by \"$PG_USER\""
        pg_admin -v d="$PG_DB" -v r="$PG_USER" <<<'CREATE DATABASE :"d" OWNER :"r"'
    elif [[ $(pg_admin -v d="$PG_DB" -v r="$PG_USER" \
            <<<"SELECT has_database_privilege(:'r', :'d', 'CONNECT') AND has_database_privilege(:'r', :'d', 'CREATE')") != t ]]; then
        say "granting CONNECT, CREATE on database \"$PG_DB\" to \"$PG_USER\""
        pg_admin -v d="$PG_DB" -v r="$PG_USER" <<<'GRANT CONNECT, CREATE ON DATABASE :"d" TO :"r"'
    fi
}

trust_local_role() {
    local hba line tmp
    hba=$(pg_admin <<<'SHOW hba_file')
    [[ -f $hba ]] || fail "cannot find pg_hba.conf (SHOW hba_file said '$hba')"
    line="host    $PG_DB    $PG_USER    127.0.0.1/32    trust"
    if grep -Eq "^host[[:space:]]+$PG_DB[[:space:]]+$PG_USER[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust" "$hba"; then
        return 1
    fi
    tmp=$(mktemp)
    awk -v add="$line" '!done && /^[[:space:]]*(local|host|hostssl|hostnossl|hostgssenc|hostnogssenc|include)/ {
        print "# added by odoledger scripts/deps.sh: the test role connects without a password"
        print add; done = 1 } { print } END { if (!done) print add }' "$hba" >"$tmp"
    cat "$tmp" >"$hba"  # keeps the file's owner and mode
    rm -f "$tmp"
    pg_admin <<<'SELECT pg_reload_conf()' >/dev/null
    say "changed $hba: added '$line' above the other rules, and reloaded PostgreSQL"
}

ready() {
    say "PostgreSQL ready: $PG_HOST:$PG_PORT database $PG_DB, role $PG_USER$([[ -n $PG_PASS ]] \
        && echo ", password from ODO_TEST_PG" || echo ", no password needed")"
}

ensure_postgres() {
    command -v psql >/dev/null && command -v pg_isready >/dev/null \
        || fail "psql and pg_isready are missing (apt-get install -y postgresql-client)"
    parse_url
    if ! answering; then
        is_local || fail "PostgreSQL at $PG_HOST:$PG_PORT ($PG_URL) does not answer; only a local server is managed here"
        start_server
    fi
    local err
    if err=$(try_connect); then
        ready
        return
    fi
    is_local || fail "cannot use $PG_URL: $err"
    need_root_for "cannot connect as $PG_USER to $PG_DB: $err"
    ensure_role_and_db
    if ! err=$(try_connect); then
        if [[ -z $PG_PASS && $err =~ password|authentication|pg_hba ]]; then
            trust_local_role || true
        fi
        err=$(try_connect) || fail "still cannot connect as $PG_USER to $PG_URL: $err"
    fi
    ready
}

# --- the broker's plugin -------------------------------------------------------------------------

PLUGIN=/usr/local/lib/odoledger/odo_doors.so

ensure_plugin() {
    local src here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    src=$here/deploy/mosquitto/odo_doors.c
    if [[ -f $PLUGIN && $PLUGIN -nt $src ]]; then
        say "broker plugin present: $PLUGIN"
        return
    fi
    if ! is_root; then
        say "the broker plugin $PLUGIN (for deploy/mosquitto/odoledger.conf) is missing or older than its" \
            "source; install it with: sudo make -C deploy/mosquitto OUT=/tmp install"
        return
    fi
    local out
    out=$(mktemp -d)
    make -s -C "$here/deploy/mosquitto" OUT="$out" install >/dev/null
    rm -rf "$out"
    say "installed the broker plugin: $PLUGIN"
}

ensure_packages
ensure_postgres
ensure_plugin
