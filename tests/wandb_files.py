"""Read back what W&B wrote for an offline run (the `run-<id>.wandb` record log).

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of records, each `crc32 (4) | length (2, little-endian) | type (1) | data`, where
type 1 is a whole record and 2/3/4 the first/middle/last piece of one split across blocks.
Each whole record is a serialised `wandb_internal_pb2.Record`.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = 7
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", "not a W&B record log"
    out, pending, pos = [], b"", HEADER
    while pos + 7 <= len(raw):
        room = BLOCK - pos % BLOCK
        if room < 7:  # block trailer too short for a header: skip to the next block
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            pending = data
        elif kind == FIRST:
            pending = data
            continue
        elif kind == MIDDLE:
            pending += data
            continue
        elif kind == LAST:
            pending += data
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        out.append(record)
    return out


def read_offline_run(run_dir: str | Path) -> dict:
    """{"id", "group", "job_type", "name", "tags", "config": {key: value}, "history": [{key: value}],
    "summary": {key: value}} of the offline run in `run_dir` (a `wandb/offline-run-*` folder)."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    result = {"config": {}, "history": [], "summary": {}}
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            result.update(id=run.run_id, group=run.run_group, job_type=run.job_type, name=run.display_name,
                          tags=list(run.tags))
            result["config"].update({i.key: json.loads(i.value_json) for i in run.config.update})
        elif kind == "config":
            result["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            result["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            result["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    return result
