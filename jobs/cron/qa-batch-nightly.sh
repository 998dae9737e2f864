#!/usr/bin/env bash
# Nightly wrapper for cron: one run at a time (a lock file), a dated log per run, and the
# exit code of qa-batch passed on. An interrupted or failed run resumes on the next call.
#
#   qa-batch-nightly.sh JOB.toml [LOG_DIR]
#
# Environment: QA_BATCH (the command, default "qa-batch"), QA_BATCH_LOCK (default
# <QA_BATCH_LOCK_DIR>/<job name>.lock, the folder $XDG_RUNTIME_DIR/qa-batch or ~/.cache/qa-batch,
# private to the user: a lock in a shared /tmp could be a link another user planted). A lock
# path that is a symbolic link is refused (exit 2).
set -uo pipefail
config=${1:?usage: qa-batch-nightly.sh JOB.toml [LOG_DIR]}
log_dir=${2:-${QA_BATCH_LOG_DIR:-/var/log/qa-batch}}
name=$(basename "$config" .toml)
lock_dir=${QA_BATCH_LOCK_DIR:-${XDG_RUNTIME_DIR:-$HOME/.cache}/qa-batch}
lock=${QA_BATCH_LOCK:-$lock_dir/$name.lock}
mkdir -p "$log_dir"
log="$log_dir/$name-$(date -u +%Y-%m-%dT%H%M%SZ).log"

if [ -z "${QA_BATCH_LOCK:-}" ]; then (umask 077; mkdir -p "$lock_dir"); fi
if [ -L "$lock" ]; then
  echo "$(date -u +%FT%TZ) qa-batch $name: the lock $lock is a symbolic link; remove it (or set QA_BATCH_LOCK)" | tee -a "$log" >&2
  exit 2
fi
exec 9>>"$lock"  # appending: never truncates what the path names
if ! flock -n 9; then
  echo "$(date -u +%FT%TZ) qa-batch $name: the previous run still holds $lock; not starting" | tee -a "$log" >&2
  exit 75  # EX_TEMPFAIL: try again at the next slot
fi
echo "$(date -u +%FT%TZ) qa-batch $name: starting (log $log)" >>"$log"
# shellcheck disable=SC2086
${QA_BATCH:-qa-batch} run --config "$config" >>"$log" 2>&1
code=$?
echo "$(date -u +%FT%TZ) qa-batch $name: exit code $code" >>"$log"
exit $code
