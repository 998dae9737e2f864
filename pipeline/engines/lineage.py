"""--lineage: OpenLineage run events, so that orchestrators and catalogs (Airflow, Dagster,
Marquez, DataHub) see what a run read and wrote.

    START      when the run begins: the inputs, the output, the model and the options
    COMPLETE   when the output is written (or committed to its table): its row count, the summary
    FAIL       when the run ends with an error (exit 2 or 3): the message
    ABORT      when a signal stopped it (exit 130 or 143): its finished parts are kept

Events go through the official client (`openlineage-python`), configured as its users configure
it: `OPENLINEAGE_URL` (and `OPENLINEAGE_API_KEY`), an `openlineage.yml`, or
`OPENLINEAGE__TRANSPORT__TYPE=file` / `console`; the job's namespace is `OPENLINEAGE_NAMESPACE`
(default `qa-batch`) and its name `qa-batch.<output name>`. Datasets are named by OpenLineage's
conventions: a local path in the `file` namespace by its absolute path, `s3://bucket/key` in
the `s3://bucket` namespace by `key` (likewise gs://, abfss://, hdfs://host:port). A transport
that fails (a lineage server down) is logged as a warning: lineage never fails the job.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from typing import Callable
from urllib.parse import urlsplit

from .. import __version__, storage
from ..config import RunConfig
from ..errors import Interrupted, QaBatchError, UsageError
from .report import RunSummary

PRODUCER = f"https://github.com/qa-batch/qa-batch/tree/v{__version__}"


def dataset_name(spec: str) -> tuple[str, str]:
    """(namespace, name) of a path or URI, by OpenLineage's naming conventions."""
    if not storage.is_uri(spec):
        return "file", os.path.abspath(spec.removeprefix("file://"))
    u = urlsplit(spec)
    name = u.path if u.scheme == "hdfs" else u.path.lstrip("/")
    return f"{u.scheme}://{u.netloc}", name or "/"


def _client():
    try:
        from openlineage.client import OpenLineageClient
    except ImportError:
        raise UsageError("--lineage needs the OpenLineage client: pip install 'qa-batch[lineage]' (in a checkout: "
                         "pip install -e '.[lineage]')") from None
    return OpenLineageClient()


class Lineage:
    """The events of one run (one process), sharing one run id."""

    def __init__(self, config: RunConfig):
        import attr
        from openlineage.client.facet_v2 import RunFacet

        @attr.define
        class QaBatchRunFacet(RunFacet):
            """qa-batch's own facet: the model, the options, and at the end the run summary."""

            model: str = attr.field(default="")
            options: dict = attr.field(factory=dict)
            summary: dict | None = attr.field(default=None)

        self.facet_type = QaBatchRunFacet
        self.config = config
        self.client = _client()
        self.run_id = str(uuid.uuid4())
        self.namespace = os.environ.get("OPENLINEAGE_NAMESPACE", "qa-batch")

    def _job(self, output: str | None):
        from openlineage.client.event_v2 import Job
        from openlineage.client.facet_v2 import job_type_job

        name = storage.basename(storage.without_trailing_slash(output)) if output else "answers"
        return Job(namespace=self.namespace, name=f"qa-batch.{name.removesuffix('.parquet')}",
                   facets={"jobType": job_type_job.JobTypeJobFacet(processingType="BATCH", integration="QA_BATCH",
                                                                   jobType="JOB")})

    def _emit(self, state: str, output: str | None, run_facets: dict, output_facets: dict | None = None) -> None:
        from openlineage.client.event_v2 import InputDataset, OutputDataset, Run, RunEvent, RunState
        from openlineage.client.facet_v2 import processing_engine_run

        facets = {"processing_engine": processing_engine_run.ProcessingEngineRunFacet(version=__version__,
                                                                                      name="qa-batch"),
                  "qa_batch": self.facet_type(model=self.config.model, options=self.config.as_dict()), **run_facets}
        inputs = [InputDataset(*dataset_name(spec)) for spec in self.config.inputs]
        outputs = [OutputDataset(*dataset_name(output), outputFacets=output_facets or {})] if output else []
        event = RunEvent(eventType=getattr(RunState, state), eventTime=dt.datetime.now(dt.timezone.utc).isoformat(),
                         producer=PRODUCER, run=Run(runId=self.run_id, facets=facets), job=self._job(output),
                         inputs=inputs, outputs=outputs)
        try:
            self.client.emit(event)
        except Exception as e:  # noqa: BLE001 - lineage must never fail the job
            logging.getLogger("qa_batch").warning("could not emit the OpenLineage %s event: %s", state, e)

    def start(self) -> None:
        self._emit("START", self.config.output, {})

    def complete(self, summary: RunSummary) -> None:
        from openlineage.client.facet_v2 import output_statistics_output_dataset as stats

        facets = {"qa_batch": self.facet_type(model=self.config.model, options=self.config.as_dict(),
                                              summary=summary.as_dict())}
        self._emit("COMPLETE", summary.output, facets,
                   {"outputStatistics": stats.OutputStatisticsOutputDatasetFacet(rowCount=output_rows(summary, self.config.wide))})

    def fail(self, message: str) -> None:
        from openlineage.client.facet_v2 import error_message_run

        self._emit("FAIL", self.config.output, {"errorMessage": error_message_run.ErrorMessageRunFacet(
            message=message, programmingLanguage="python")})

    def abort(self) -> None:
        self._emit("ABORT", self.config.output, {})


def output_rows(summary: RunSummary, wide: bool) -> int:
    """The rows of the output: documents' answers, input rows with --wide, else answers."""
    if summary.documents:
        return summary.documents
    if wide and summary.questions_per_row:
        return summary.rows // summary.questions_per_row
    return summary.rows


def observed(config: RunConfig, run: Callable[[], RunSummary]) -> RunSummary:
    """`run()`, announced to OpenLineage with --lineage: START, then COMPLETE, FAIL or ABORT."""
    if not config.lineage:
        return run()
    events = Lineage(config)
    events.start()
    try:
        summary = run()
    except Interrupted:
        events.abort()
        raise
    except QaBatchError as e:
        events.fail(e.message)
        raise
    except KeyboardInterrupt:
        events.abort()
        raise
    except Exception as e:
        events.fail(f"{type(e).__name__}: {e}")
        raise
    events.complete(summary)
    return summary
