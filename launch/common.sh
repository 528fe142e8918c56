# Shared by the launch scripts: required variables and the dry-run switch.
# DRY_RUN=1 prints every command instead of running it.

# require VAR "what it is, with an example": exits with a clear message when VAR is empty.
require() {
  local name=$1 what=$2
  if [ -z "${!name:-}" ]; then
    echo "error: $name is not set: $what" >&2
    echo "       e.g. $name=... $0 ${*:3}" >&2
    exit 2
  fi
}

# run CMD...: prints the command (shell-quoted), then runs it unless DRY_RUN=1. The line is
# one write: commands started side by side in the background would interleave otherwise.
run() {
  printf '+%s\n' "$(printf ' %q' "$@")"
  if [ "${DRY_RUN:-0}" != 1 ]; then
    "$@"
  fi
}
