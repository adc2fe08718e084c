"""``python -m bench.gpu_summary FILE``: one line of a bench's ``--json-out`` for gpu_check.sh.

The rows' rates and the ratios, ``; ``-separated, so each bench is one row of the GPU table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def summarize(data: dict[str, Any]) -> str:
    parts = [f"{r['name']}: {r['rate']:,.1f} {r.get('unit', 'img')}/s" for r in data["rows"]]
    parts += [f"{r['name']} {r['value']:.2f}x" for r in data["ratios"] if r["value"] is not None]
    parts += [f"{s['name']}: skipped ({s['reason'][:60]})" for s in data["skipped"]]
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(summarize(json.loads(Path(args[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
