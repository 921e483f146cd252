"""`bdtk models` and `bdtk datasets`: what can be named on the command line."""

from __future__ import annotations

from rich.table import Table

from ..console import console
from ..data import available_datasets, dataset_spec
from ..models import available_models
from .common import app


@app.command()
def models() -> None:
    """List the model zoo."""
    table = Table(title="bdtk models")
    table.add_column("name")
    table.add_column("description")
    for entry in available_models():
        table.add_row(entry.name, entry.description)
    console.print(table)


@app.command()
def datasets() -> None:
    """List the datasets bdtk can load."""
    table = Table(title="bdtk datasets")
    for col in ("name", "classes", "shape"):
        table.add_column(col)
    for name in available_datasets():
        spec = dataset_spec(name)
        table.add_row(name, str(spec.num_classes), "×".join(map(str, spec.image_shape)))
    console.print(table)
