"""The snapshot endpoints (issue #4), wired into :mod:`gpud.api`'s table.

* ``GET /v1/snapshots`` - the caller's snapshots (an admin's: everyone's), with their
  state, size, restores and the last failure;
* ``DELETE /v1/snapshots/{id}`` - remove one (its files too); the function's
  next call takes a new one. A failed snapshot is brought back into use this way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gpud.api_params import MAX_ID, Param, parse_id
from gpud.daemon.port import JobService
from gpud.http_common import ApiError
from gpud.http_common import json_response as _json
from gpud.http_common import principal as _principal
from gpud.ledger import snapshots as store
from gpud_client.models import SnapshotInfo, SnapshotList

__all__ = ["SNAPSHOT_DOC", "snapshot_routes"]

SNAPSHOT_DOC: list[tuple[str, str, str, type | None, type | None, tuple[Param, ...]]] = [
    ("get", "/snapshots", "Container snapshots (Podman executor)", None, SnapshotList, ()),
    (
        "delete",
        "/snapshots/{snapshot_id}",
        "Remove a snapshot and its files",
        None,
        SnapshotInfo,
        (),
    ),
]


def info(s: store.Snapshot) -> SnapshotInfo:
    return SnapshotInfo(
        id=s.id,
        function=s.function,
        owner=s.owner,
        image=s.image,
        state=s.state,
        size=s.size,
        created_at=s.created_at,
        last_used=s.last_used,
        restores=s.restores,
        failures=s.failures,
        last_error=s.last_error,
        taken_by=s.taken_by,
    )


def snapshot_routes(daemon: JobService) -> list[tuple[str, str, Callable[[Request], Any]]]:
    async def list_snapshots(request: Request) -> Response:
        who = _principal(request)
        snaps = await daemon.snapshot_records(None if who.admin else who.name)
        note = (
            None
            if daemon.snapshots is not None
            else (
                f"the {daemon.executor.name} executor takes no snapshots: snapshot=True jobs run "
                'as without; snapshots need executor = "podman"'
            )
        )
        used = sum(s.size for s in snaps if s.state == "ready")
        return _json(
            SnapshotList(
                snapshots=[info(s) for s in snaps],
                executor=daemon.executor.name,
                max_bytes=daemon.config.snapshot_max_bytes,
                used_bytes=used,
                note=note,
            )
        )

    async def remove_snapshot(request: Request) -> Response:
        raw = request.path_params["snapshot_id"]
        snapshot_id = parse_id(raw)
        if snapshot_id is None:
            raise ApiError(
                422,
                "invalid_snapshot_id",
                f"{raw[:40]!r} is not a snapshot id (a whole number from 1 to "
                f"{MAX_ID}): see `gpud snapshots`",
            )
        who = _principal(request)
        found = [s for s in await daemon.snapshot_records() if s.id == snapshot_id]
        if not found or not (who.admin or found[0].owner == who.name):
            # Others' snapshots are as unknown as missing ones.
            raise ApiError(404, "not_found", f"no snapshot {raw} of yours: see `gpud snapshots`")
        s = found[0]
        if daemon.snapshots is None:
            await daemon.delete_snapshot_record(s.id)
        else:
            if daemon.snapshots.in_use(s) or s.state == "taking":
                raise ApiError(
                    409,
                    "in_use",
                    f"snapshot {s.id} is being "
                    f"{'taken' if s.state == 'taking' else 'restored'} now; "
                    "try again in a moment",
                )
            await daemon.snapshots.remove(s)
        return _json(info(s))

    return [
        ("GET", "/snapshots", list_snapshots),
        ("DELETE", "/snapshots/{snapshot_id}", remove_snapshot),
    ]
