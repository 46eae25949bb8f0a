"""Parses a Prometheus text exposition (stdin) with the official prometheus_client parser and
prints, as JSON, each family's type and its samples' names: what a Prometheus server would
ingest. Exits non-zero (with the parser's error) when the text is not valid exposition."""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families

families = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    families[f.name] = {
        "type": f.type,
        "samples": sorted({s.name for s in f.samples}),
        "labels": sorted({k for s in f.samples for k in s.labels}),
    }
json.dump(families, sys.stdout)
