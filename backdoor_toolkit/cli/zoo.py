"""`bdtk models` and `bdtk datasets`: what can be named on the command line."""

from __future__ import annotations

from ..console import console
from ..data import available_datasets, dataset_spec
from ..models import available_models
from .common import app
from .listing import listing_table


@app.command()
def models() -> None:
    """List the model zoo."""
    table = listing_table("bdtk models", names=("name",), prose=("description",))
    for entry in available_models():
        table.add_row(entry.name, entry.description)
    console.print(table)


@app.command()
def datasets() -> None:
    """List the datasets bdtk can load."""
    table = listing_table("bdtk datasets", names=("name", "classes", "shape"), prose=())
    for name in available_datasets():
        spec = dataset_spec(name)
        table.add_row(name, str(spec.num_classes), "×".join(map(str, spec.image_shape)))
    console.print(table)
