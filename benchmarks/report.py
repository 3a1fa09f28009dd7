"""The end of a benchmark script: close the report with the load it ran under, print it as
JSON and, when asked, write the same text to a file."""
from __future__ import annotations

import json
import os
from pathlib import Path


def finish_report(report: dict, path: str | None) -> None:
    report["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
