"""Opening one split of a Hugging Face dataset: the one opener that training data and evaluation share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets

from .errors import RetrofitError, first_line

IMAGEFOLDER_PREFIX = "imagefolder:"
Split = datasets.Dataset | datasets.IterableDataset


def is_saved_dataset(spec: str | Path) -> bool:
    """A folder written by HF ``save_to_disk`` (a Dataset or a DatasetDict)."""
    path = Path(spec)
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def open_split(
    spec: str | Path, split: str | None = None, streaming: bool = False, columns: Sequence[str | None] = ()
) -> Split:
    """One split of the dataset ``spec`` names, with ``columns`` checked; every failure is one line.

    ``spec``: a ``save_to_disk`` folder, ``imagefolder:DIR`` (HF's image-folder loader), or anything
    ``datasets.load_dataset`` opens (a hub name, a local folder with ``metadata.jsonl``).
    ``split=None`` takes the only split there is. ``streaming`` gives an IterableDataset where the
    loader supports it (a saved folder is returned as it is).
    """
    spec = str(spec)
    try:
        if is_saved_dataset(spec):
            loaded = datasets.load_from_disk(spec)
        elif spec.startswith(IMAGEFOLDER_PREFIX):
            loaded = datasets.load_dataset("imagefolder", data_dir=spec.removeprefix(IMAGEFOLDER_PREFIX), split=split,
                                           streaming=streaming)
        else:
            loaded = datasets.load_dataset(spec, split=split, streaming=streaming)
    except Exception as e:  # hub, network, builder and split errors all mean: this spec cannot be opened
        raise RetrofitError(
            f"cannot open dataset {spec!r} split {split!r} ({first_line(e, root=True)}): pass an image folder, "
            "a save_to_disk folder or a Hugging Face dataset name and one of its splits."
        ) from e
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is None and len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        elif split not in loaded:
            raise RetrofitError(f"dataset {spec!r} has splits {', '.join(loaded)}: choose one with split=... "
                                f"(got {split!r}).")
        else:
            loaded = loaded[split]
    names = loaded.column_names
    absent = [c for c in columns if c is not None and names is not None and c not in names]
    if absent:
        raise RetrofitError(f"dataset {spec!r} has no column {absent[0]!r} (columns: {', '.join(names)}): "
                            "name the right column.")
    return loaded
