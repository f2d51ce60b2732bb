"""Flower Arrays to and from numpy without the per-array costs of `np.save` / `np.load`.

A Flower `Array` holds an array as `.npy` bytes plus its dtype and shape. `Array.numpy()` runs `np.load`,
which parses the text header with `ast.literal_eval` (about 0.2 ms an array here), and `Array(tensor)` runs
`np.save`; with 50-100 small clients a round those per-array costs, not the arithmetic, set the pace of a
round. The bytes written here are exactly `np.save`'s (tested), so Flower and every other reader decode them
as before, and what is read is checked against the Array's own dtype and shape, else `np.load` decides.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.messages import get_record, get_records

_MAGIC = b"\x93NUMPY"
_NPY = "numpy.ndarray"  # Flower's SType.NUMPY


def as_numpy(array: Array) -> np.ndarray:
    """The array's values as a read-only numpy view of its bytes (no copy), or `array.numpy()` for anything
    that is not a plain C-ordered .npy of the Array's own dtype and shape."""
    data = array.data
    if array.stype == _NPY and data[:6] == _MAGIC:
        major = data[6]
        if major == 1:
            offset = 10 + int.from_bytes(data[8:10], "little")
        elif major in (2, 3):
            offset = 12 + int.from_bytes(data[8:12], "little")
        else:
            offset = -1
        dtype = np.dtype(array.dtype)
        shape = tuple(array.shape)
        if (offset > 0 and b"'fortran_order': False" in data[:offset] and not dtype.hasobject
                and len(data) - offset == math.prod(shape) * dtype.itemsize):
            return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return array.numpy()


@functools.lru_cache(maxsize=4096)
def _header(descr: str, shape: tuple[int, ...]) -> bytes:
    """np.save's header for a C-ordered array of this dtype and shape (format 1.0, as np.save picks)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def to_array(values: Any) -> Array:
    """An Array of a numpy array or a torch tensor (on any device), holding exactly the bytes `np.save` would
    write. (torch is not imported here: the commands that need no training must not pay for it.)"""
    if not isinstance(values, np.ndarray) and hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    values = np.asarray(values)
    if not values.flags.c_contiguous:
        values = np.ascontiguousarray(values)  # (never on a 0-d array, which it would make 1-d)
    if values.dtype.hasobject:
        return Array(values)  # Flower refuses it with its own message
    descr = np.lib.format.dtype_to_descr(values.dtype)
    # One copy of the values (header + values.tobytes() made two)
    data = b"".join((_header(descr, tuple(values.shape)), values.reshape(-1).view(np.uint8)))
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=_NPY, data=data)


def array_record(state: Mapping[str, Any]) -> ArrayRecord:
    """An ArrayRecord of a state dict (or any name -> array mapping), in its order."""
    return ArrayRecord({name: to_array(values) for name, values in state.items()})


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in the record, from each Array's dtype and shape (nothing decoded)."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in record.values())


# Deployed messages carry each ArrayRecord as one Array. Flower 1.41 sends every Array (and its chunk) as a
# separate object, one HTTP request per object on each hop (ServerApp -> SuperLink -> SuperNode -> ClientApp
# task and back): a 12-tensor CNN made 28 objects a message, traced at ~20 ms a request on this machine, most
# of the 0.3-0.6 s a deployed task waited for its inputs. Packed, a message is 6-7 objects.
PACKED = "fedpriv.packed"  # the ConfigRecord that lists what each packed ArrayRecord held


def pack_arrays(content: RecordDict, memo: dict[int, tuple[ArrayRecord, str]] | None = None) -> None:
    """In place: every ArrayRecord of `content` with more than one Array becomes a single uint8 Array of the
    Arrays' bytes, described in content[PACKED]. `memo` (by record id) packs a record shared by many messages
    once, so the object store still sees one object for all of them."""
    memo = {} if memo is None else memo
    layouts: dict[str, str] = {}
    for name, arrays in get_records(content, ArrayRecord):
        if len(arrays) < 2:
            continue
        if id(arrays) not in memo:
            parts = list(arrays.items())
            layout = [[key, a.dtype, list(a.shape), a.stype, len(a.data)] for key, a in parts]
            blob = np.frombuffer(b"".join(a.data for _, a in parts), dtype=np.uint8)
            memo[id(arrays)] = (ArrayRecord({"packed": to_array(blob)}), json.dumps(layout))
        content[name], layouts[name] = memo[id(arrays)]
    if layouts:
        content[PACKED] = ConfigRecord(layouts)


def unpack_arrays(content: RecordDict) -> bool:
    """In place: undoes pack_arrays. False when `content` was not packed. A layout that does not add up to
    the packed bytes raises ValueError (a corrupt or forged message), never a silently shifted tensor."""
    layouts = get_record(content, PACKED, ConfigRecord)
    if layouts is None:
        return False
    del content[PACKED]
    for name, text in layouts.items():
        packed = get_record(content, name, ArrayRecord)
        if packed is None or "packed" not in packed:
            raise ValueError(f"packed record {name!r} is missing from the message; the message is corrupt")
        blob = as_numpy(packed["packed"]).tobytes()
        arrays, offset = {}, 0
        for key, dtype, shape, stype, size in json.loads(str(text)):
            arrays[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=blob[offset:offset + size])
            offset += size
        if offset != len(blob):
            raise ValueError(f"packed record {name!r}: its layout covers {offset} bytes, the message holds "
                             f"{len(blob)}; the message is corrupt")
        content[name] = ArrayRecord(arrays)
    return True
