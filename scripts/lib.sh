# shellcheck shell=bash disable=SC2034
# Shared helpers for scripts/*.sh (sourced, not run).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCAL=$ROOT/.local
# TLS material made by scripts/certs.sh; a second instance may use its own (OUTBOX_CERTS_DIR).
CERTS=$(realpath -m "${OUTBOX_CERTS_DIR:-$LOCAL/certs}")

# Name the failing command instead of exiting silently under `set -e`.
set -o errtrace
trap 'echo "$(basename "$0"): error: line $LINENO: \`$BASH_COMMAND\` failed" >&2' ERR

die() { echo "$(basename "$0"): error: $*" >&2; exit 1; }
note() { echo "$(basename "$0"): $*" >&2; }

# apt_install PKG...: install missing Debian packages, non-interactively.
# Runs `apt-get update` at most once per process tree (OUTBOX_APT_UPDATED=1 skips it).
apt_install() {
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]}; fix: sudo apt-get install -y ${missing[*]}"
  note "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${OUTBOX_APT_UPDATED:-}" ]; then
    apt-get update -qq || die "apt-get update failed; check the Debian mirror in /etc/apt/sources.list*"
    export OUTBOX_APT_UPDATED=1
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed (see output above)"
}

# port_busy PORT: true if something listens on 127.0.0.1:PORT.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# tail_log FILE: last lines of a service log, for error messages.
tail_log() { echo "--- last 30 lines of $1 ---" >&2; tail -n 30 "$1" >&2 2>/dev/null || true; }

# A killed process lingers as a zombie until init reaps it (about 1-2 s on this machine kind);
# `kill -0` and pg_ctl count zombies as alive, so look at the process state instead.
# (Read from /proc: a minimal Debian has no procps.)
state() { [ -n "$1" ] && sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$1/status" 2>/dev/null || true; }
live() { case "$(state "$1")" in ''|Z|X) return 1 ;; esac; }
zombie() { [ "$(state "$1")" = Z ]; }
children() { grep -ls "^PPid:[[:space:]]*$1\$" /proc/[0-9]*/status 2>/dev/null | cut -d/ -f3 || true; }

# wait_gone SECONDS PID...: wait until the processes are reaped (their files and ports released).
wait_gone() {
  local n=$(($1 * 10)) p; shift
  for _ in $(seq "$n"); do
    for p in "$@"; do [ -e "/proc/$p" ] && { sleep 0.1; continue 2; }; done
    return 0
  done
  return 1
}

# lock DIR: serialize state changes (start/stop/kill9) of one service instance across callers.
# Fd 9 must not leak into daemons (close it with 9>&- when launching them).
lock() { mkdir -p "$1" && exec 9>"$1/.lock" && flock 9; }
