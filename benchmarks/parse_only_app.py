"""The benchmark baseline: a FastAPI endpoint that only parses the event.

Whatever keywatch does beyond this is the cost of scoring; the benchmark reports the
service's requests/s as a share of this endpoint's, measured in the same run.
"""

from __future__ import annotations

from fastapi import FastAPI

from features.contract import Event

app = FastAPI(title="keywatch benchmark baseline")


@app.post("/v1/events")
def parse_only(event: Event) -> dict[str, object]:
    return {"decision": "allow", "tokens": event.tokens}
