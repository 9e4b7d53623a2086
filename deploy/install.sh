#!/bin/sh
# Install ainode as a systemd service; run again to upgrade (idempotent).
#
#   deploy/install.sh [--root DIR] [--package DIR|WHEEL] [--python PY] [--pip-args ARGS]
#   deploy/install.sh --uninstall [--purge] [--root DIR]
#
# Creates the system user "ainode", /etc/ainode/ainode.toml (kept if present),
# /var/lib/ainode (data), a virtual environment in /opt/ainode/venv with the node
# installed from --package (default: this checkout; or a built wheel), and the systemd units.
# --root DIR installs into DIR as a staging root (DESTDIR-style, e.g. for packaging
# or tests): no user is created, nothing is chowned and systemctl is not called.
# --uninstall removes the program and the units but keeps /etc/ainode and
# /var/lib/ainode (the configuration, the queue and the received images) unless --purge.
set -eu

ROOT=/
DEPLOY=$(cd "$(dirname "$0")" && pwd)
PACKAGE=$(dirname "$DEPLOY")
PYTHON=python3
PIP_ARGS=""
ACTION=install
PURGE=no
USER_NAME=ainode

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=$2; shift 2 ;;
        --package) PACKAGE=$2; shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        --pip-args) PIP_ARGS=$2; shift 2 ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=yes; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; usage 2 ;;
    esac
done

ROOT=${ROOT%/}
LIVE=no
[ -z "$ROOT" ] && LIVE=yes
OPT=$ROOT/opt/ainode
ETC=$ROOT/etc/ainode
DATA=$ROOT/var/lib/ainode
UNITS=$ROOT/etc/systemd/system

say() { echo "ainode install: $*"; }

systemctl_live() {
    if [ "$LIVE" = yes ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl "$@"
    fi
}

if [ "$ACTION" = uninstall ]; then
    systemctl_live stop 'ainode-worker@*.service' 2>/dev/null || true
    systemctl_live disable --now ainode.service 2>/dev/null || true
    rm -f "$UNITS/ainode.service" "$UNITS/ainode-worker@.service"
    systemctl_live daemon-reload || true
    rm -rf "$OPT"
    if [ "$PURGE" = yes ]; then
        rm -rf "$ETC" "$DATA"
        if [ "$LIVE" = yes ] && id "$USER_NAME" >/dev/null 2>&1; then
            userdel "$USER_NAME" || true
        fi
        say "removed the program, units, configuration and data"
    else
        say "removed the program and units; kept $ETC and $DATA (--purge removes them)"
    fi
    exit 0
fi

if [ ! -f "$PACKAGE/pyproject.toml" ] && [ "${PACKAGE%.whl}" = "$PACKAGE" ]; then
    echo "install.sh: --package $PACKAGE is neither a source tree nor a wheel" >&2
    exit 2
fi

if [ "$LIVE" = yes ] && ! id "$USER_NAME" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/ainode --no-create-home \
        --shell /usr/sbin/nologin --comment "ainode AI node" "$USER_NAME"
    say "created system user $USER_NAME"
fi

install -d -m 0755 "$OPT" "$UNITS"
install -d -m 0750 "$ETC" "$DATA"
if [ ! -e "$ETC/ainode.toml" ]; then
    install -m 0640 "$DEPLOY/ainode.example.toml" "$ETC/ainode.toml"
    say "wrote $ETC/ainode.toml: edit it, then: ainode check-config $ETC/ainode.toml"
else
    say "kept the existing $ETC/ainode.toml"
fi
if [ "$LIVE" = yes ]; then
    chown -R "$USER_NAME:$USER_NAME" "$DATA"
    chown "root:$USER_NAME" "$ETC" "$ETC/ainode.toml"
fi

if [ ! -x "$OPT/venv/bin/python" ]; then
    "$PYTHON" -m venv "$OPT/venv"
    say "created the virtual environment $OPT/venv"
fi
# shellcheck disable=SC2086  # PIP_ARGS is a list of options
"$OPT/venv/bin/python" -m pip install --quiet --disable-pip-version-check $PIP_ARGS "$PACKAGE"
say "installed ainode into $OPT/venv"

install -m 0644 "$DEPLOY/ainode.service" "$UNITS/ainode.service"
install -m 0644 "$DEPLOY/ainode-worker@.service" "$UNITS/ainode-worker@.service"
systemctl_live daemon-reload
say "installed the units; start with: systemctl enable --now ainode"
say "one worker per GPU: set workers.count = 0, then systemctl enable --now ainode-worker@0"
