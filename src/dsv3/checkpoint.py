"""Training checkpoints: tensors in safetensors, metadata in JSON, written atomically.

A checkpoint is a directory ``RUN/checkpoints/step-000123/`` holding ``model.safetensors``,
``optim.safetensors``, ``extra.safetensors`` (RNG state, EMA …) and ``meta.json`` (step, data
position, non-tensor optimizer state, the SHA-256 of every file, and ``meta_sha256``: the SHA-256 of
meta.json's own content without that key, so an edit of meta.json is caught too).

A run on several ranks writes it **sharded** (:func:`save_sharded`, the 3FS pattern: every rank writes
its own part in parallel, no rank gathers the model): ``model-rank00003.safetensors`` … hold each
tensor once, by its single-process name, an expert-parallel tensor as row ranges ``name@a:b`` (experts
a … b−1) from the ranks holding them; ``meta.json`` lists the shards (``shards``). Either form reads
back as the single-process tensors through :class:`CheckpointReader`, whatever the layout that reads
it — so a checkpoint resumes under any other layout. It is first written as
``.tmp-step-000123``: each file fsync'ed, then the directory renamed into place and the parent
fsync'ed, so a crash leaves either the old set of checkpoints or the new one, never half a
checkpoint under a final name. On load, checksums are verified, newest first; a checkpoint that
fails is skipped with a warning naming it, and the first save after that resume renames the skipped ones
to ``step-000123.broken`` (``broken=`` of the save functions; nothing is deleted), so that later resumes
and pruning no longer see them. A save that fails (a full disk) removes its temporary
directory and raises a ``UserError`` saying how much space it needed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings

import torch

from .errors import UserError

_NAME = re.compile(r"^step-(\d{9})$")
_FILES = ("model.safetensors", "optim.safetensors", "extra.safetensors")


def write_json_atomic(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, replacing any old file in one step (written, synced, renamed)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def meta_digest(meta: dict) -> str:
    """SHA-256 of a checkpoint's metadata (every key but ``meta_sha256``), in a canonical JSON form."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flatten_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able metadata."""
    tensors, meta_state = {}, {}
    for pid, st in sd["state"].items():
        meta_state[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                meta_state[str(pid)][k] = v
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in g.items()})
    return tensors, {"state": meta_state, "param_groups": groups}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("moment_dtype"), str):
            g["moment_dtype"] = getattr(torch, g["moment_dtype"].replace("torch.", ""))
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(ckpt_root: str, step: int, model_state: dict[str, torch.Tensor],
                    optim_tensors: dict[str, torch.Tensor], extra_tensors: dict[str, torch.Tensor],
                    meta: dict, keep: int = 3, broken=()) -> str:
    """Write one checkpoint atomically and prune to the newest ``keep``. Returns its path. ``broken``: names of
    checkpoints a resume skipped, set aside (:func:`set_aside`) once this one is in place."""
    from safetensors.torch import save_file

    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step-{step:09d}"
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}")
    _remove_stale(ckpt_root)
    groups = {"model.safetensors": model_state, "optim.safetensors": optim_tensors,
              "extra.safetensors": extra_tensors}
    need = sum(t.numel() * t.element_size() for g in groups.values() for t in g.values()) + (1 << 20)
    free = shutil.disk_usage(ckpt_root).free
    if free < need:
        raise UserError(_no_space(final, need, free))
    try:
        os.makedirs(tmp)
        checksums = {}
        for fn, tensors in groups.items():
            path = os.path.join(tmp, fn)
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            checksums[fn] = file_sha256(path)
        _write_meta(tmp, dict(meta, step=step, checksums=checksums))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(_no_space(final, need, shutil.disk_usage(ckpt_root).free)) from None
        if isinstance(e, OSError):
            raise UserError(f"cannot write checkpoint {final}: {e.strerror or e}"
                            f"{' (' + e.filename + ')' if e.filename else ''}; the newest complete checkpoint "
                            f"is kept") from None
        raise
    _publish(tmp, final, ckpt_root, keep, broken)
    return final


def _write_meta(tmp: str, meta: dict) -> None:
    """meta.json with its own checksum, fsync'ed, into the temporary checkpoint directory."""
    meta["meta_sha256"] = meta_digest(meta)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _publish(tmp: str, final: str, ckpt_root: str, keep: int, broken=()) -> None:
    """Rename the complete temporary directory into place, set the ``broken`` ones aside and prune to the
    newest ``keep`` up to it. Later ones (broken checkpoints a resume skipped to an earlier one) are not
    counted: they took the places of the valid ones, deleting the checkpoint just written."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    set_aside(ckpt_root, [n for n in broken if n != os.path.basename(final)])
    upto = [n for n in list_checkpoints(ckpt_root) if n <= os.path.basename(final)]
    for old in upto[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)


def set_aside(ckpt_root: str, names) -> list[str]:
    """Rename the checkpoints ``names`` (broken ones a resume skipped) to ``NAME.broken`` (``NAME.broken-2`` …
    when taken): kept on disk, but no longer listed, so no later resume warns about them again and pruning
    does not count them. One warning line says what was moved. Returns the new names."""
    moved = []
    for name in names:
        src = os.path.join(ckpt_root, name)
        if not _NAME.match(name) or not os.path.isdir(src):
            continue
        new, k = f"{name}.broken", 1
        while os.path.exists(os.path.join(ckpt_root, new)):
            k += 1
            new = f"{name}.broken-{k}"
        os.rename(src, os.path.join(ckpt_root, new))
        moved.append(new)
    if moved:
        _fsync_dir(ckpt_root)
        warnings.warn(f"set aside the checkpoint{'s' if len(moved) > 1 else ''} the resume skipped as broken: "
                      f"{', '.join(moved)} in {ckpt_root} (no longer resumed from or counted by --keep; delete "
                      f"{'them' if len(moved) > 1 else 'it'} when no longer needed)", stacklevel=3)
    return moved


def _remove_stale(ckpt_root: str) -> None:
    """Temporary directories left by a killed save."""
    for stale in os.listdir(ckpt_root):
        if stale.startswith(".tmp-step-"):
            shutil.rmtree(os.path.join(ckpt_root, stale), ignore_errors=True)


def _no_space(final: str, need: int, free: int) -> str:
    return (f"not enough disk space for checkpoint {final}: it needs about {need / 1e6:,.1f} MB, "
            f"{free / 1e6:,.1f} MB are free (free {max(need - free, 0) / 1e6:,.1f} MB more, or lower --keep); "
            f"the newest complete checkpoint is kept")


def list_checkpoints(ckpt_root: str) -> list[str]:
    """Checkpoint directory names, oldest first (temporary directories excluded)."""
    if not os.path.isdir(ckpt_root):
        return []
    return sorted(n for n in os.listdir(ckpt_root) if _NAME.match(n))


def verify_checkpoint(path: str) -> dict:
    """Return the checkpoint's metadata, or raise ValueError saying what is wrong with it."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable meta.json ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError("meta.json does not hold a JSON object")
    if meta.get("meta_sha256") != meta_digest(meta):
        raise ValueError("meta.json does not match its checksum (edited or corrupted)" if "meta_sha256" in meta
                         else "meta.json has no checksum of its own (edited, or written by an older dsv3)")
    for fn in _files(meta):
        p = os.path.join(path, fn)
        if not os.path.exists(p):
            raise ValueError(f"{fn} is missing")
        if not isinstance(meta.get("checksums"), dict) or file_sha256(p) != meta["checksums"].get(fn):
            raise ValueError(f"{fn} does not match its checksum (truncated or corrupted)")
    return meta


def newest_valid(ckpt_root: str, warn: bool = True) -> tuple[str | None, dict[str, str]]:
    """The checkpoint a resume loads: the newest under ``ckpt_root`` that verifies
    (:func:`verify_checkpoint`), and ``{name: what is wrong}`` of the newer ones that do not (each skipped
    with a warning naming it when ``warn``; the next save sets them aside, :func:`set_aside`). (None, …)
    when none verifies. The one answer to "which checkpoint is the run's newest": every reader asks it."""
    skipped: dict[str, str] = {}
    for name in reversed(list_checkpoints(ckpt_root)):
        path = os.path.join(ckpt_root, name)
        try:
            verify_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any failure means: skip this one
            if warn:
                warnings.warn(f"skipping checkpoint {path}: {e}", stacklevel=2)
            skipped[name] = str(e)
            continue
        return path, skipped
    return None, skipped


def load_latest(ckpt_root: str) -> tuple[str, dict, dict[str, dict[str, torch.Tensor]]] | None:
    """The newest checkpoint that verifies (:func:`newest_valid`): (path, meta, {file: tensors}); None if
    there is none. Checkpoints that fail verification are skipped with a warning naming them."""
    path, _ = newest_valid(ckpt_root)
    if path is None:
        return None
    meta = verify_checkpoint(path)
    reader = CheckpointReader(path, meta)
    return path, meta, {f"{kind}.safetensors": reader.tensors(kind) for kind in KINDS}


# ----------------------------------------------------------------------------------------- sharded
KINDS = ("model", "optim", "extra")


def _files(meta: dict) -> list[str]:
    shards = meta.get("shards")
    if isinstance(shards, dict):
        return sorted(fn for kind in KINDS for fn in shards.get(kind, {}))
    return list(_FILES)


def rows_key(key: str, rows: range) -> str:
    """The stored name of rows ``rows`` of the single-process tensor ``key``."""
    return f"{key}@{rows.start}:{rows.stop}"


def save_sharded(ckpt_root: str, step: int, pieces: dict[str, dict[str, torch.Tensor]], meta: dict | None,
                 keep: int, rank: int, world: int, group=None, broken=()) -> str | None:
    """Collective over ``group`` (``world`` ranks): every rank writes its ``pieces`` (kind → {stored
    name: tensor}, see :func:`rows_key`) into the checkpoint's temporary directory at the same time and
    checksums its own files; rank 0 then writes ``meta.json`` (``meta``: its metadata) listing every
    shard and renames the directory into place — atomic as :func:`save_checkpoint`: a crash of any rank
    before the rename leaves the previous checkpoints as they were. A failure on any rank fails the save
    on every rank (``UserError``). ``broken`` (rank 0): as :func:`save_checkpoint`. Returns the path on rank 0."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    name = f"step-{step:09d}"
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}")
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        _remove_stale(ckpt_root)
        os.makedirs(tmp)
    dist.barrier(group=group)
    mine: dict = {"files": {}, "error": None}
    try:
        for kind, tensors in pieces.items():
            if not tensors:
                continue
            fn = f"{kind}-rank{rank:05d}.safetensors"
            path = os.path.join(tmp, fn)
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            mine["files"][fn] = (kind, sorted(tensors), file_sha256(path))
    except OSError as e:
        mine["error"] = f"rank {rank}: {e.strerror or e}{' (' + e.filename + ')' if e.filename else ''}"
    everyone = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    errors = [r["error"] for r in everyone if r["error"]]
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final}: {'; '.join(errors)}; the newest complete checkpoint "
                        f"is kept")
    if rank != 0:
        dist.barrier(group=group)
        return None
    try:
        shards: dict = {kind: {} for kind in KINDS}
        checksums = {}
        for r in everyone:
            for fn, (kind, keys, digest) in r["files"].items():
                shards[kind][fn] = keys
                checksums[fn] = digest
        _write_meta(tmp, dict(meta or {}, step=step, checksums=checksums, shards=shards))
        _publish(tmp, final, ckpt_root, keep, broken)
    finally:
        dist.barrier(group=group)
    return final


class CheckpointReader:
    """The single-process tensors of a checkpoint, read lazily by name, whether it was written whole
    (``model.safetensors`` …) or sharded by :func:`save_sharded` (row ranges assembled)."""

    def __init__(self, path: str, meta: dict | None = None):
        from safetensors import safe_open

        if meta is None:
            with open(os.path.join(path, "meta.json")) as f:
                meta = json.load(f)
        self.path, self.meta = path, meta
        self._open = lambda fn: safe_open(os.path.join(path, fn), "pt")
        self._handles: dict = {}
        # kind -> full name -> [(file, stored name, row range or None)]
        self._where: dict = {kind: {} for kind in KINDS}
        shards = meta.get("shards")
        for kind in KINDS:
            files = shards.get(kind, {}) if isinstance(shards, dict) else {f"{kind}.safetensors": None}
            for fn, keys in files.items():
                if keys is None:
                    keys = list(self._file(fn).keys())
                for stored in keys:
                    full, _, rng = stored.partition("@")
                    rows = range(*map(int, rng.split(":"))) if rng else None
                    self._where[kind].setdefault(full, []).append((fn, stored, rows))

    def _file(self, fn: str):
        if fn not in self._handles:
            self._handles[fn] = self._open(fn).__enter__()
        return self._handles[fn]

    def keys(self, kind: str) -> list[str]:
        return list(self._where[kind])

    def get(self, kind: str, key: str) -> torch.Tensor:
        parts = self._where[kind].get(key)
        if not parts:
            raise KeyError(f"{self.path}: no {kind} tensor {key!r}")
        if parts[0][2] is None:
            return self._file(parts[0][0]).get_tensor(parts[0][1])
        parts = sorted(parts, key=lambda p: p[2].start)
        if [p[2].start for p in parts] != [0, *[p[2].stop for p in parts[:-1]]]:
            raise ValueError(f"{self.path}: the row ranges of {key!r} do not tile it")
        return torch.cat([self._file(fn).get_tensor(stored) for fn, stored, _ in parts])

    def tensors(self, kind: str) -> dict[str, torch.Tensor]:
        return {k: self.get(kind, k) for k in self.keys(kind)}
