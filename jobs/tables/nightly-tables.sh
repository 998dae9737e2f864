#!/usr/bin/env bash
# A night's answers into the tables analysts query: a Delta table and an Iceberg table, both
# partitioned by date. Rerunning a night replaces that night's partition (in one commit per
# table), so each night's answers are in each table once; a run killed midway resumes.
#
#   nightly-tables.sh INPUT [DATE]      DATE: the partition, default today (UTC), e.g. 2026-12-01
#
# Environment:
#   DELTA_TABLE       the Delta table: a folder or an s3:// URI (unset: no Delta run)
#   ICEBERG_TABLE     the Iceberg table as NAMESPACE.TABLE (unset: no Iceberg run), in the catalog
#   ICEBERG_CATALOG   named here (default "default"), configured as pyiceberg does
#                     (~/.pyiceberg.yaml, or PYICEBERG_CATALOG__<NAME>__URI and __WAREHOUSE)
#   QA_BATCH          the command (default "qa-batch"); QA_BATCH_MODEL the checkpoint
#   QA_BATCH_OPTIONS  more options for both runs, e.g. "--allow-null --lineage"
# Most teams keep one of the two tables; both are here to show each.
set -euo pipefail
input=${1:?usage: nightly-tables.sh INPUT [DATE]}
night=${2:-$(date -u +%F)}
qa=${QA_BATCH:-qa-batch}
if [ -z "${DELTA_TABLE:-}" ] && [ -z "${ICEBERG_TABLE:-}" ]; then
  echo "nightly-tables.sh: set DELTA_TABLE, ICEBERG_TABLE or both" >&2
  exit 2
fi
# shellcheck disable=SC2086  # QA_BATCH and QA_BATCH_OPTIONS are word lists
if [ -n "${DELTA_TABLE:-}" ]; then
  $qa run "$input" --table-format delta -o "$DELTA_TABLE" --partition "date=$night" ${QA_BATCH_OPTIONS:-}
fi
# shellcheck disable=SC2086
if [ -n "${ICEBERG_TABLE:-}" ]; then
  $qa run "$input" --table-format iceberg --catalog "${ICEBERG_CATALOG:-default}" -o "$ICEBERG_TABLE" \
    --partition "date=$night" ${QA_BATCH_OPTIONS:-}
fi
