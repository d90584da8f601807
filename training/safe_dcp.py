"""Reading a torch.distributed.checkpoint folder without running code from it.

torch.distributed.checkpoint stores a checkpoint's index (`.metadata`) as a pickle, and each non-tensor value of
the state dict (the optimiser's learning rates, betas, step counts) as a `torch.load` pickle with
`weights_only=False`. Either is code execution for whoever can write into a run folder, and run folders are shared
and downloaded. This reader unpickles `.metadata` admitting only what the index is made of (the metadata module's
own dataclasses and enums, the filesystem's _StorageInfo, torch.Size, dtypes, layouts, memory formats, paths), and
the planner reads the values with `weights_only=True`; anything else is refused with `UnsafeCheckpointError`.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

METADATA_NAME = ".metadata"
_PATHS = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file names something a checkpoint never holds: it was not written by torch's checkpointing."""


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in (dcp_metadata.__name__, dcp_filesystem.__name__):
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch" and name == "Size":
            return torch.Size
        elif module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        elif module == "torch.serialization" and name == "_get_layout":
            return torch.serialization._get_layout  # maps a layout's name to the layout
        elif module == "pathlib" and name in _PATHS:
            return getattr(pathlib, name)
        elif module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"the checkpoint index refers to {module}.{name}, which no checkpoint holds "
                                    f"(the file was not written by torch's checkpointing); it was not loaded")


def read_index(data: bytes):
    """The checkpoint index (dcp's Metadata) from the bytes of a `.metadata` file, admitting only its own classes."""
    index = _IndexUnpickler(io.BytesIO(data)).load()
    if not isinstance(index, dcp_metadata.Metadata):
        raise UnsafeCheckpointError(f"the checkpoint index holds a {type(index).__name__}, not dcp's Metadata")
    return index


class SafeReader(FileSystemReader):
    """FileSystemReader whose index is read by `read_index` instead of a bare `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        name = METADATA_NAME if rank is None else f"__{rank}{METADATA_NAME}"
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "rb") as stream:
            data = stream.read()
        try:
            index = read_index(data)
        except UnsafeCheckpointError as e:
            self.refused = e  # torch re-raises it as text inside other errors; `load` raises it as itself
            raise
        if getattr(index, "storage_meta", None) is None:
            index.storage_meta = dcp_metadata.StorageMeta()
        index.storage_meta.load_id = self.load_id
        return index


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads each non-tensor value with `torch.load(weights_only=True)` first: plain
    numbers, strings, tuples, lists and dicts pass, anything that would run code is refused."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            why = next((line for line in str(e).splitlines() if "unsupported global" in line.lower()), "not a plain value")
            self.refused = UnsafeCheckpointError(f"the checkpoint value {read_item.dest_index.fqn} is not plain "
                                                 f"data ({why.strip()}); it was not loaded")
            raise self.refused from None
        value.seek(0)
        super().load_bytes(read_item, value)  # the same bytes, now known to be plain data


def load(state_dict: dict, path) -> None:
    """torch.distributed.checkpoint.load into `state_dict` from the folder `path`, running no code from it.
    A refused file raises UnsafeCheckpointError (on this rank); any other failure is torch's own."""
    reader, planner = SafeReader(path), SafePlanner()
    try:
        torch.distributed.checkpoint.load(state_dict, storage_reader=reader, planner=planner)
    except (Exception, CheckpointException):  # CheckpointException is not an Exception
        refused = getattr(reader, "refused", None) or getattr(planner, "refused", None)
        if refused is not None:
            raise refused from None
        raise
