#!/usr/bin/env bash
# Installs inference-core as a systemd service (run as root, from a clone, after
# `cargo build --release`): the binary and the restore helper in /usr/local/bin,
# the configuration in /etc/inference-core (kept if already there), a system
# user, the default model in /var/lib/inference-core/models, and the unit.
# Then enables and starts the service and waits for /health.
# Running it again upgrades the binary, the helper and the unit.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "error: run as root (sudo $0)" >&2; exit 1; }
[ -x target/release/inference-core ] ||
    { echo "error: build first: cargo build --release" >&2; exit 1; }

install -m 0755 target/release/inference-core /usr/local/bin/inference-core
install -m 0755 systemd/inference-core-restore /usr/local/bin/inference-core-restore
install -d -m 0755 /etc/inference-core
[ -f /etc/inference-core/inference-core.toml ] ||
    install -m 0644 config/inference-core.toml /etc/inference-core/inference-core.toml

id inference-core >/dev/null 2>&1 ||
    useradd --system --home-dir /var/lib/inference-core --shell /usr/sbin/nologin inference-core
install -d -o inference-core -g inference-core -m 0750 /var/lib/inference-core /var/lib/inference-core/models
INFERENCE_CORE_CACHE=/var/lib/inference-core/models scripts/fetch-model.sh >/dev/null
chown -R inference-core:inference-core /var/lib/inference-core

install -m 0644 systemd/inference-core.service /etc/systemd/system/inference-core.service
systemctl daemon-reload
systemctl enable inference-core.service
/usr/local/bin/inference-core-restore
