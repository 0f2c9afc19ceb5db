"""Where python -m classify writes its outcomes, one per image, and what it wrote before (for --resume).

A results file (JSONL or CSV, on the local disk) is appended to and synced after every batch, so a crash loses
at most the batch in flight. A results dataset is a folder of part files: s3://bucket/prefix (object stores
have no append) or a local folder, and any Parquet output (a Parquet file cannot be appended to). Each part is
written whole, by one PUT or a rename, every --part-size images and at the end, so a crash loses at most the
part in progress and no image is ever in two parts. A shard writes only its own parts
(part-{i}-of-{n}-{seq}.{format}), so shards never collide and a resumed shard reads only its own.

Rows: path, status, error, model_version and the predictions: JSONL as the API's entries; CSV flat
(label_1, index_1, score_1, ...); Parquet with `predictions` a list of {label, index, score} structs.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from classifier import storage
from classifier.storage import ObjectURL

Line = dict[str, Any]  # {"path", "predictions", "model_version"} or {"path", "error": {"status", "detail"}}
FORMATS = ("jsonl", "csv", "parquet")


def parquet_schema() -> Any:
    import pyarrow as pa

    prediction = pa.struct([("label", pa.string()), ("index", pa.int32()), ("score", pa.float64())])
    return pa.schema([("path", pa.string()), ("status", pa.int32()), ("error", pa.string()),
                      ("model_version", pa.string()), ("predictions", pa.list_(prediction))])


def row(line: Line) -> dict[str, Any]:
    """A line as a Parquet row: the error's status and detail in columns of their own, predictions nested."""
    error = line.get("error") or {}
    return {"path": line["path"], "status": error.get("status"), "error": error.get("detail"),
            "model_version": line.get("model_version"), "predictions": line.get("predictions", [])}


def encode(lines: list[Line], format: str, k: int, header: bool = True) -> bytes:
    if format == "jsonl":
        return "".join(json.dumps(line) + "\n" for line in lines).encode()
    if format == "csv":
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, columns(k))
        if header:
            writer.writeheader()
        writer.writerows(flat(line) for line in lines)
        return text.getvalue().encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row(line) for line in lines], parquet_schema()), out)
    return out.getvalue()


def recorded(data: bytes, format: str) -> list[tuple[str, str | None]]:
    """(path, model version) of each row of a file or part."""
    if format == "jsonl":
        lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    elif format == "csv":
        lines = list(csv.DictReader(io.StringIO(data.decode())))
    else:
        import pyarrow.parquet as pq

        lines = pq.read_table(io.BytesIO(data), columns=["path", "model_version"]).to_pylist()
    return [(line["path"], line.get("model_version") or None) for line in lines]


def columns(k: int) -> list[str]:
    ranked = [f"{name}_{rank}" for rank in range(1, k + 1) for name in ("label", "index", "score")]
    return ["path", "status", "error", "model_version", *ranked]


def flat(line: Line) -> dict[str, Any]:
    error = line.get("error", {})
    flattened = {"path": line["path"], "status": error.get("status", ""), "error": error.get("detail", ""),
                 "model_version": line.get("model_version", "")}
    for rank, prediction in enumerate(line.get("predictions", []), start=1):
        flattened.update({f"{name}_{rank}": value for name, value in prediction.items()})
    return flattened


class ResultsFile:
    """A local JSONL or CSV file, appended to and synced after every batch."""

    def __init__(self, path: Path, format: str, k: int) -> None:
        self.path, self.format, self.k = path, format, k

    def exists(self) -> bool:
        return self.path.exists()

    def done(self) -> dict[str, str | None]:
        """The paths already recorded, with the model version of each prediction. A torn last line (a crash
        mid-write) is cut off first."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        return dict(recorded(data, self.format))

    def append(self, lines: list[Line]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("ab") as file:
            file.write(encode(lines, self.format, self.k, header=new))
            file.flush()
            os.fsync(file.fileno())

    def finish(self) -> None:
        pass


class ResultsDataset:
    """Part files in a local folder or under s3://bucket/prefix/, each written whole."""

    def __init__(self, folder: Path | ObjectURL, format: str, k: int, shard: tuple[int, int], part_size: int) -> None:
        self.folder, self.format, self.k, self.part_size = folder, format, k, part_size
        self.stem = f"part-{shard[0]:05d}-of-{shard[1]:05d}-"
        self.pending: list[Line] = []
        self.next_part = 0

    def parts(self) -> list[str]:
        """This shard's part names, in the order they were written."""
        pattern = re.compile(re.escape(self.stem) + r"(\d{6})\." + self.format + "$")
        if isinstance(self.folder, ObjectURL):
            names = (key.rsplit("/", 1)[-1] for key in storage.keys(self.folder.below(self.stem)))
        else:
            names = (path.name for path in self.folder.glob(f"{self.stem}*")) if self.folder.is_dir() else ()
        return sorted(name for name in names if pattern.match(name))

    def exists(self) -> bool:
        return bool(self.parts())

    def done(self) -> dict[str, str | None]:
        done: dict[str, str | None] = {}
        parts = self.parts()
        for name in parts:
            done.update(recorded(self._read(name), self.format))
        self.next_part = int(parts[-1][len(self.stem): len(self.stem) + 6]) + 1 if parts else 0
        return done

    def append(self, lines: list[Line]) -> None:
        self.pending += lines
        while len(self.pending) >= self.part_size:
            self._write_part(self.part_size)

    def finish(self) -> None:
        if self.pending:
            self._write_part(len(self.pending))

    def _write_part(self, size: int) -> None:
        name = f"{self.stem}{self.next_part:06d}.{self.format}"
        data = encode(self.pending[:size], self.format, self.k)
        if isinstance(self.folder, ObjectURL):
            storage.write(self.folder.below(name), data)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = self.folder / f".{name}.partial"
            partial.write_bytes(data)
            with partial.open("rb") as file:
                os.fsync(file.fileno())
            partial.replace(self.folder / name)  # whole or not at all
        self.pending, self.next_part = self.pending[size:], self.next_part + 1

    def _read(self, name: str) -> bytes:
        if isinstance(self.folder, ObjectURL):
            return storage.read(self.folder.below(name))
        return (self.folder / name).read_bytes()


def open_results(out: str, format: str, k: int, shard: tuple[int, int], part_size: int) -> ResultsFile | ResultsDataset:
    """--out: s3://bucket/prefix, a folder (an existing one, or a name ending in /) or Parquet: a dataset of
    parts; a local file name otherwise."""
    if storage.is_url(out):
        return ResultsDataset(ObjectURL.parse(out), format, k, shard, part_size)
    if format == "parquet" or out.endswith("/") or Path(out).is_dir():
        return ResultsDataset(Path(out), format, k, shard, part_size)
    return ResultsFile(Path(out), format, k)
