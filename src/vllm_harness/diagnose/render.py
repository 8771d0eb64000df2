"""diagnose's report for people: a table (rich), the fix filled with the variant's values."""
from __future__ import annotations

from typing import Any

from vllm_harness.core.runner import emit
from vllm_harness.diagnose.rules import Report


def render_table(report: Report, console: Any = None, show: bool = True) -> str:
    """Print the report as a rich table (id, line, evidence, fix) to ``console`` (default: a new
    stdout Console; nothing when ``show`` is False) and return the rendered plain text.  When
    nothing is recognised, the first error block is printed under the table."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"diagnose: {report.log}", show_lines=True, expand=False)
    table.add_column("id", no_wrap=True)
    table.add_column("line", justify="right", no_wrap=True)
    table.add_column("evidence", overflow="fold", max_width=70)
    table.add_column("fix", overflow="fold", max_width=70)
    for f in report.findings:
        ident = Text(f.id, style="bold red" if f.severity == "error" else "yellow")
        if f.explained_by:
            ident.append(f"\n(follows from\n{', '.join(f.explained_by)})", style="dim")
        table.add_row(ident, str(f.line), Text(f.evidence), Text(f.fix))
    parts: list[Any] = [table]
    if not report.findings:
        table.caption = "No known failure recognised."
        if report.first_error_lines:
            block = Text("First error block:\n", style="bold")
            for n, text in report.first_error_lines:
                block.append(f"{n:>7}  ", style="dim")
                block.append(text + "\n")
            parts.append(block)

    return emit(parts, console, show)
