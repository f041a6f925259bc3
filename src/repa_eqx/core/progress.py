"""The progress bar of long work (training, sampling, preprocessing): a label, the bar, done
of total, the rate, the ETA and, optionally, a free-text field. Tasks set `rate` (and `info`)
as fields: `bar.add_task(label, total=n, rate="", info="")`."""

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def progress_bar(
    label: str, *, console=None, disable: bool = False, bar_width: int = 20, info: bool = True
) -> Progress:
    columns = [
        TextColumn(f"[bold]{label}"),
        BarColumn(bar_width=bar_width),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, console=console, disable=disable, refresh_per_second=4)
