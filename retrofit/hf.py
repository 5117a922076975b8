"""Opening one split of a Hugging Face dataset: the one opener that training data and evaluation share."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import datasets

from .errors import RetrofitError, first_line
from .network import hub_or_cache

IMAGEFOLDER_PREFIX = "imagefolder:"
Split = datasets.Dataset | datasets.IterableDataset


def is_saved_dataset(spec: str | Path) -> bool:
    """A folder written by HF ``save_to_disk`` (a Dataset or a DatasetDict)."""
    path = Path(spec)
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def open_split(
    spec: str | Path,
    split: str | None = None,
    streaming: bool = False,
    columns: Mapping[str, str | None] | None = None,
    cli_prefix: str | None = None,
) -> Split:
    """One split of the dataset ``spec`` names, with ``columns`` checked; every failure is one line.

    ``spec``: a ``save_to_disk`` folder, ``imagefolder:DIR`` (HF's image-folder loader), or anything
    ``datasets.load_dataset`` opens (a hub name, a local folder with ``metadata.jsonl``).
    ``split=None`` takes the only split there is. ``streaming`` gives an IterableDataset where the
    loader supports it (a saved folder is returned as it is). ``columns`` maps each setting that names
    a column (``image_column``) to the column it names (None: not used); a missing one is an error that
    lists the dataset's columns and says what to set, with the command line's option when ``cli_prefix``
    (``--data.``) is given.
    """
    spec = str(spec)
    local = is_saved_dataset(spec) or spec.startswith(IMAGEFOLDER_PREFIX) or Path(spec).exists()
    # A hub name without a route to the Hub: the cache or a failure at once, not minutes of retries.
    with nullcontext() if local else hub_or_cache() as unreachable:
        try:
            if is_saved_dataset(spec):
                loaded = datasets.load_from_disk(spec)
            elif spec.startswith(IMAGEFOLDER_PREFIX):
                loaded = datasets.load_dataset("imagefolder", data_dir=spec.removeprefix(IMAGEFOLDER_PREFIX),
                                               split=split, streaming=streaming)
            else:
                loaded = datasets.load_dataset(spec, split=split, streaming=streaming)
        except Exception as e:  # hub, network, builder and split errors all mean: this spec cannot be opened
            cause = f"{unreachable}, and it is not in the local cache" if unreachable else first_line(e, root=True)
            raise RetrofitError(
                f"cannot open dataset {spec!r} split {split!r} ({cause}): pass an image folder, "
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
    _check_columns(loaded, spec, columns or {}, cli_prefix)
    return loaded


def _check_columns(dataset: Split, spec: str, columns: Mapping[str, str | None], cli_prefix: str | None) -> None:
    """One line naming the columns there are (and the image column, when the features say) for a wrong name."""
    names = dataset.column_names
    if names is None:  # a stream without declared features: its first row shows them
        names = list(next(iter(dataset), {}))
    for option, column in columns.items():
        if column is None or column in names:
            continue
        images = [n for n, f in (dataset.features or {}).items() if isinstance(f, datasets.Image)]
        hint = images[0] if option == "image_column" and len(images) == 1 else f"one of {', '.join(names)}"
        cli = f" (CLI: {cli_prefix}{option})" if cli_prefix else ""
        raise RetrofitError(f"dataset {spec!r} has no column {column!r} (its columns: {', '.join(names) or 'none'}): "
                            f"set {option} to {hint}{cli}.")
