"""Write BENCHMARKS.md: the goals summary (benchmarks/summary.md) then every results file.

Each benchmark script writes its own figures to benchmarks/results/<area>.md with the command
and the machine; this only puts them together so BENCHMARKS.md is never edited by hand.
Run: python3 benchmarks/collect.py
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["probe_engine", "netprobes", "round_kz", "history", "daemon", "detection", "reports",
         "lab", "scale"]


def demote(markdown: str) -> str:
    """Every heading one level down (outside code blocks), so a file becomes a section."""
    out, in_code = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        out.append("#" + line if line.startswith("#") and not in_code else line)
    return "\n".join(out)


def main() -> None:
    results = HERE / "results"
    names = [n for n in ORDER if (results / f"{n}.md").exists()]
    names += sorted(p.stem for p in results.glob("*.md") if p.stem not in ORDER)
    parts = [(HERE / "summary.md").read_text().rstrip() + "\n"]
    for name in names:
        text = (results / f"{name}.md").read_text().rstrip()
        parts.append(f"\n<!-- from benchmarks/results/{name}.md -->\n" + demote(text) + "\n")
    (HERE.parent / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote BENCHMARKS.md from summary.md and {len(names)} results files")


if __name__ == "__main__":
    main()
