# Shared by scripts/test, scripts/demo and .ci/run: make sure the parts Pulse runs
# against are installed and running. Installs with apt-get only when run as root;
# otherwise says what to install.

PULSE_APT_PACKAGES="systemd postgresql postgresql-client openssl rabbitmq-server tmux php-cli php-amqp php-symfony-messenger php-symfony-amqp-messenger php-symfony-serializer php-symfony-property-access"

log() { printf '==> %s\n' "$*" >&2; }

pg_bindir() {
    local d
    if command -v pg_config >/dev/null 2>&1; then
        d=$(pg_config --bindir)
        [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    fi
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$d" ] && [ -x "$d/initdb" ] && { echo "$d"; return 0; }
    return 1
}

missing_packages() {
    local p missing=""
    for p in ${1:-$PULSE_APT_PACKAGES}; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    echo "$missing"
}

# ensure_packages [LIST]: installs what LIST (default: everything the tests need) lacks.
ensure_packages() {
    local missing
    missing=$(missing_packages "${1:-}")
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        log "missing packages:$missing"
        log "install them as root: apt-get install -y$missing"
        return 1
    fi
    log "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' own scripts from starting services (no init system is assumed);
    # we start what we need ourselves, below.
    local added_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy=yes
    fi
    apt-get update -qq
    # shellcheck disable=SC2086
    if ! apt-get install -y -qq --no-install-recommends $missing >/dev/null; then
        [ -n "$added_policy" ] && rm -f /usr/sbin/policy-rc.d
        log "apt-get install failed for:$missing"
        return 1
    fi
    [ -n "$added_policy" ] && rm -f /usr/sbin/policy-rc.d
    return 0
}

amqp_up() {
    # A TCP connection to the AMQP port is the test that matters to us.
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null
}

ensure_rabbitmq() {
    [ -n "${PULSE_TEST_AMQP_URL:-}" ] && return 0
    amqp_up && return 0
    if [ "$(id -u)" -ne 0 ]; then
        log "RabbitMQ is not running on 127.0.0.1:5672; start it (as root: rabbitmq-server -detached) or set PULSE_TEST_AMQP_URL"
        return 1
    fi
    log "starting RabbitMQ"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    local i
    for i in $(seq 1 120); do
        amqp_up && rabbitmqctl -q await_startup >/dev/null 2>&1 && return 0
        sleep 1
    done
    log "RabbitMQ did not come up within 120 s"
    return 1
}

ensure_postgres_server() {
    if ! pg_bindir >/dev/null; then
        log "PostgreSQL server binaries (initdb) not found; install postgresql"
        return 1
    fi
}

# A TCP port nobody listens on right now.
free_port() {
    local p
    while :; do
        p=$(( 20000 + RANDOM % 30000 ))
        (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo "$p"; return 0; }
    done
}

# as_postgres CMD...: runs a PostgreSQL tool as the postgres user when we are root.
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# ensure_moto: moto's S3-compatible server (PyPI `moto[server]`), for the S3 backend
# tests, in a virtualenv under target/; exports PULSE_TEST_MOTO for the tests.
ensure_moto() {
    if [ -n "${PULSE_TEST_MOTO:-}" ]; then return 0; fi
    local venv="target/moto-venv"
    if [ ! -x "$venv/bin/moto_server" ]; then
        log "installing moto[server] (an S3-compatible server for the S3 backend tests) into $venv"
        if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q 'moto[server]'; }; then
            log "could not install moto[server]; the S3 backend test will fail and say so"
            return 0
        fi
    fi
    PULSE_TEST_MOTO="$PWD/$venv/bin/moto_server"
    export PULSE_TEST_MOTO
}
