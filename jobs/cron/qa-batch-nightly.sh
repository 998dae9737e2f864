#!/usr/bin/env bash
# Nightly wrapper for cron: one run at a time (a lock file), a dated log per run, and the
# exit code of qa-batch passed on. An interrupted or failed run resumes on the next call.
#
#   qa-batch-nightly.sh JOB.toml [LOG_DIR]
#
# Environment: QA_BATCH (the command, default "qa-batch"), QA_BATCH_LOCK (default
# /tmp/qa-batch-<job name>.lock).
set -uo pipefail
config=${1:?usage: qa-batch-nightly.sh JOB.toml [LOG_DIR]}
log_dir=${2:-${QA_BATCH_LOG_DIR:-/var/log/qa-batch}}
name=$(basename "$config" .toml)
lock=${QA_BATCH_LOCK:-/tmp/qa-batch-$name.lock}
mkdir -p "$log_dir"
log="$log_dir/$name-$(date -u +%Y-%m-%dT%H%M%SZ).log"

exec 9>"$lock"
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
