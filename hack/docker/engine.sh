#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine.
#   engine.sh up    use the running engine, or install Debian's docker.io (root, apt) and start dockerd by hand with
#                   a runc wrapper that drops capabilities this host cannot grant (see runc-wrapper)
#   engine.sh down  stop the dockerd this script started (an engine that was already running is left alone)
#   engine.sh status
# State (pid file, log, wrapper path) lives in $RAGTUNE_DOCKER_STATE (default /tmp/ragtune-docker).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${RAGTUNE_DOCKER_STATE:-/tmp/ragtune-docker}"
log() { echo "docker-engine: $*" >&2; }
die() { log "$*"; exit 1; }

answers() { docker info --format '{{.ServerVersion}}' >/dev/null 2>&1; }

ours_running() {
  [[ -f "$state/dockerd.pid" ]] && kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null
}

install_engine() {
  command -v dockerd >/dev/null && return 0
  [[ $(id -u) -eq 0 ]] || die "no Docker engine answers and dockerd is not installed; as root run: apt-get install -y docker.io"
  command -v apt-get >/dev/null || die "no Docker engine answers and there is no apt-get to install one; install Docker and retry"
  log "installing Debian's docker.io"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker.io >"$state/apt.log" 2>&1 \
    || { apt-get update >>"$state/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker.io >>"$state/apt.log" 2>&1; } \
    || die "apt-get install docker.io failed; see $state/apt.log"
}

up() {
  if answers; then
    log "engine answers ($(docker info --format '{{.ServerVersion}}'))"
    return 0
  fi
  mkdir -p "$state"
  install_engine
  [[ $(id -u) -eq 0 ]] || die "dockerd must be started as root"
  # The real runc is found once, here, so the wrapper never calls itself.
  local real_runc
  real_runc="$(command -v runc || true)"
  [[ -n "$real_runc" ]] || die "runc not found (Debian package: runc)"
  cat >"$state/runc" <<WRAP
#!/bin/sh
RAGTUNE_REAL_RUNC="$real_runc" exec "$here/runc-wrapper" "\$@"
WRAP
  chmod +x "$state/runc"
  log "starting dockerd (log: $state/dockerd.log)"
  setsid dockerd --pidfile "$state/dockerd.pid" \
      --add-runtime "ragtune-runc=$state/runc" --default-runtime ragtune-runc \
      >"$state/dockerd.log" 2>&1 < /dev/null &
  local i
  for i in $(seq 1 60); do
    answers && { log "engine up ($(docker info --format '{{.ServerVersion}}'))"; return 0; }
    sleep 0.5
  done
  tail -20 "$state/dockerd.log" >&2 || true
  die "dockerd did not answer within 30 s; see $state/dockerd.log"
}

down() {
  if ours_running; then
    local pid
    pid="$(cat "$state/dockerd.pid")"
    log "stopping dockerd ($pid)"
    kill "$pid"
    local i
    for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$state/dockerd.pid"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) if answers; then docker info --format '{{.ServerVersion}} {{.Driver}} {{.DefaultRuntime}}'; else echo "no engine"; exit 1; fi ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
