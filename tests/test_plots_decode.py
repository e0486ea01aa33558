"""benchmarks/plots.py's decode figure and table on a real decode JSON (no matplotlib needed:
the figure is drawn on mocks): every row gets a line, however many rows a run has."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

from benchmarks import plots

H100 = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "decode-nvidia-h100-80gb-hbm3.json"


def test_decode_figure_has_a_line_per_row_name_beyond_the_palette(tmp_path: Path) -> None:
    data = plots._load(H100)
    ok = [r for r in data["rows"] if r.get("status", "ok") == "ok" and r.get("us")]
    ours = {r["name"] for r in ok if r["name"].startswith("kvquant") and r.get("kind", "decode") == "decode"}
    assert len(ours) > 4  # more than the four greens the palette once had (it raised StopIteration)
    batches = sorted({r["batch"] for r in ok if r.get("kind", "decode") == "decode"})
    axes = [mock.MagicMock() for _ in range(len(batches) + 1)]
    plt = mock.MagicMock()
    plt.subplots.return_value = (mock.MagicMock(), [axes])
    dest = plots.plot_decode(H100, tmp_path, plt)
    assert dest == tmp_path / "decode-nvidia-h100-80gb-hbm3.png"
    one_context = {r["name"] for r in ok if r.get("kind", "decode") == "decode" and r["batch"] == 64}
    labels = [c.kwargs["label"] for c in axes[batches.index(64)].plot.call_args_list]
    assert sorted(labels) == sorted(one_context)
    colours = [c.kwargs["color"] for c in axes[batches.index(64)].plot.call_args_list]
    assert all(c in plots.OUR_COLOURS for c, n in zip(colours, labels) if n.startswith("kvquant"))


def test_decode_markdown_table_of_the_h100_run() -> None:
    table = plots.decode_markdown(H100).splitlines()
    assert table[0].startswith("| batch x context |") and len(table) == 2 + 12
    row = next(line for line in table if line.startswith("| 64 x 16k |"))
    assert row.endswith("| 90 / 90 | 1.04x / 1.04x |")
