"""Results as JSON: printed, and written to --out when given."""
from __future__ import annotations

import json


def emit_json(result: dict, out: str | None) -> dict:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return result
