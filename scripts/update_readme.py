"""Copy benchmark results into README.md between markers, so the README quotes only numbers a
script produced:

    <!-- results:losses -->  ...  <!-- /results:losses -->

is replaced by benchmarks/results/losses.md (and `results:demo` by the summary table of
runs/demo/report.md). Run after `make bench` / `make demo`:
    python scripts/update_readme.py [NAME ...]   (only those sections; default: every one)
"""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(names: list[str] | None = None) -> int:
    names = sys.argv[1:] if names is None else names
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    missing = []

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if names and name not in names:
            return match.group(0)
        result = os.path.join(ROOT, "benchmarks", "results", f"{name}.md")
        if name == "demo":
            result = os.path.join(ROOT, "runs", "demo", "report.md")
        text_output = result[:-3] + ".txt"
        if not os.path.exists(result) and os.path.exists(text_output):
            with open(text_output) as f:
                return f"<!-- results:{name} -->\n```text\n{f.read().strip()}\n```\n<!-- /results:{name} -->"
        if not os.path.exists(result):
            missing.append(name)
            return match.group(0)
        with open(result) as f:
            body = f.read().strip()
        if name == "demo":  # the corpus line and the summary table, up to the first subsection
            body = body.split("\n## ", 1)[0].split("\n", 1)[1].strip()
            body += "\n\n(`make demo`; full report in runs/demo/report.md)"
        return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"

    text = re.sub(r"<!-- results:([\w.-]+) -->.*?<!-- /results:\1 -->", fill, text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)
    for name in missing:
        print(f"note: benchmarks/results/{name}.md not found; run `make bench` first", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
