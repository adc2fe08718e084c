"""Locust users for ``bench.api_load`` (a locustfile: run by ``python -m locust -f``).

Each simulated client submits small classify jobs and polls its jobs' pages and their
predictions, as a client of the API would while workers run the jobs. Every response is
recorded here (exact latencies, status codes, the ids of the jobs the API accepted) and
written as JSON to ``API_LOAD_OUT`` when locust quits; ``bench.api_load`` reads that file.

Configuration comes from the environment ``bench.api_load`` sets: ``API_LOAD_TOKEN``,
``API_LOAD_INPUTS`` (a file with one image path per line), ``API_LOAD_MODEL_ID``,
``API_LOAD_PER_JOB``, ``API_LOAD_WAIT`` ("min,max" seconds between a client's requests),
``API_LOAD_OUT``.

Imported only inside the locust process: locust patches the standard library with gevent.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task

TOKEN = os.environ.get("API_LOAD_TOKEN", "")
INPUTS = [line for line in Path(os.environ["API_LOAD_INPUTS"]).read_text().splitlines() if line]
MODEL_ID = int(os.environ["API_LOAD_MODEL_ID"])
PER_JOB = int(os.environ.get("API_LOAD_PER_JOB", "3"))
WAIT_MIN, WAIT_MAX = (float(x) for x in os.environ.get("API_LOAD_WAIT", "1,3").split(","))
OUT = Path(os.environ["API_LOAD_OUT"])

#: name -> response times in ms; name -> status code counts; ids the API returned.
TIMES: dict[str, list[float]] = defaultdict(list)
STATUSES: dict[str, Counter[str]] = defaultdict(Counter)
SUBMITTED: list[int] = []
#: 503 answers by their detail's first words (pool exhausted reads "database busy").
UNAVAILABLE: Counter[str] = Counter()


@events.request.add_listener
def _record(name: str, response_time: float, response: Any = None, exception: Any = None,
            **_kw: Any) -> None:
    TIMES[name].append(float(response_time))
    status = getattr(response, "status_code", None)
    STATUSES[name][str(status) if status else f"error:{type(exception).__name__}"] += 1
    if status == 503:
        try:
            detail = str(response.json().get("detail", ""))
        except Exception:
            detail = "unparsable 503"
        UNAVAILABLE[" ".join(detail.split()[:2])] += 1


@events.quitting.add_listener
def _write(**_kw: Any) -> None:
    OUT.write_text(json.dumps({
        "times_ms": TIMES,
        "statuses": {name: dict(counts) for name, counts in STATUSES.items()},
        "submitted": SUBMITTED,
        "unavailable": dict(UNAVAILABLE),
    }))


class ApiClient(HttpUser):
    """One client: submits a job now and then, mostly reads its jobs and predictions."""

    wait_time = between(WAIT_MIN, WAIT_MAX)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {TOKEN}"
        self.jobs: list[int] = []
        self.submit()

    @task(1)
    def submit(self) -> None:
        body = {"inputs": random.sample(INPUTS, min(PER_JOB, len(INPUTS))),
                "model_version_id": MODEL_ID}
        with self.client.post("/jobs/classify", json=body, name="POST /jobs/classify",
                              catch_response=True) as response:
            if response.status_code == 201:
                job_id = int(response.json()["id"])
                self.jobs.append(job_id)
                SUBMITTED.append(job_id)
            else:
                response.failure(f"{response.status_code}: {response.text[:200]}")

    def _recent_job(self) -> int | None:
        # Clients poll what they submitted lately, as a submit-then-follow client does.
        return random.choice(self.jobs[-5:]) if self.jobs else None

    @task(4)
    def job_page(self) -> None:
        job_id = self._recent_job()
        if job_id is not None:
            self.client.get(f"/jobs/{job_id}", name="GET /jobs/{id}")

    @task(4)
    def predictions(self) -> None:
        job_id = self._recent_job()
        if job_id is not None:
            self.client.get(f"/jobs/{job_id}/predictions?limit=100",
                            name="GET /jobs/{id}/predictions")

    @task(1)
    def job_list(self) -> None:
        self.client.get("/jobs?limit=20", name="GET /jobs")
