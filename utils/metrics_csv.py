"""metrics.csv: one row per epoch of a run (epoch, iteration, wall time, every epoch-level metric
and learning rate), a plain CSV that pandas, spreadsheets and the csv module read as it is.

Stdlib only: `main.py list --plot` reads it without importing torch.
"""
import csv
import io
import math
from pathlib import Path

from utils.files import atomic_write

FIXED_COLUMNS = ("epoch", "iteration", "wall_time_s")


class MetricsCSV:
    """The metrics.csv of one run. Its rows stay in memory (one an epoch: small), so that a metric
    first seen later, or a resumed run that redoes epochs the file already has, rewrites the file
    whole and atomically; any other epoch appends one line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.columns = None   # read from the file (or started) at the first row
        self.rows = []        # {column: text}, as written

    def add_row(self, epoch: int, iteration: int, wall_time_s: float, metrics: dict):
        if self.columns is None:
            self.columns, self.rows = self._recorded()
        row = {"epoch": str(epoch), "iteration": str(iteration), "wall_time_s": f"{wall_time_s:.3f}",
               **{name: _text(value) for name, value in metrics.items()}}
        kept = [old for old in self.rows if _epoch(old) is not None and _epoch(old) < epoch]
        new_columns = [name for name in row if name not in self.columns]
        rewrite = new_columns or len(kept) < len(self.rows) or not self.path.is_file()
        self.columns += new_columns
        self.rows = kept + [row]
        if rewrite:
            with atomic_write(self.path, "w") as f:
                writer = self._writer(f)
                writer.writeheader()
                writer.writerows(self.rows)
        else:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                self._writer(f).writerow(row)

    def _writer(self, f) -> csv.DictWriter:
        return csv.DictWriter(f, self.columns, restval="", lineterminator="\n")

    def _recorded(self) -> tuple[list, list]:
        """(columns, rows) of the file a resumed run continues; a fresh file when there is none.
        One whose header is not this framework's is refused, not overwritten."""
        if not self.path.is_file():
            return list(FIXED_COLUMNS), []
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            if tuple(columns[:len(FIXED_COLUMNS)]) != FIXED_COLUMNS:
                raise ValueError(f"'{self.path}' does not start with the columns {', '.join(FIXED_COLUMNS)}, so "
                                 "it is not the metrics file this framework writes; move it away to get one")
            return columns, [{key: value or "" for key, value in row.items() if key is not None} for row in reader]


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.csv as {column: number}; an empty cell (a metric not measured that
    epoch) is left out of its row. [] when there is no file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        values = {key: _number(value) for key, value in row.items() if key is not None and value not in (None, "")}
        if isinstance(values.get("epoch"), int):   # a line cut short by a crash has no usable epoch
            rows.append(values)
    return rows


def _text(value) -> str:
    """Full precision (repr), and nan / inf as pandas and float() read them."""
    if hasattr(value, "item"):     # a 0-d tensor or numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return repr(value) if isinstance(value, int) or math.isfinite(value) else str(value)


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _epoch(row: dict) -> int | None:
    try:
        return int(row.get("epoch") or "")
    except ValueError:
        return None
