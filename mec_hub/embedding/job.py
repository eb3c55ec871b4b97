"""The run behind ``mec-embed`` and ``Embedder.embed_folder``: ordered, resumable, atomic, multi-process.

1. Checks, before anything is computed: the output folder is writable; the inputs exist; an
   existing output is only replaced with ``overwrite``, an unfinished one only continued with
   ``resume`` and the same inputs and options.
2. Each process (one, or one per torchrun rank) embeds its batch-aligned slice of the image list
   into its own part file, checkpointing after every batch (``checkpoint.py``).
3. The first process joins the parts into one ``.npy`` and publishes the set
   (``mec_hub.data.featurefile``): ``.paths.txt``, then the ``.npy`` (renamed), then
   ``.meta.json``, which names the run; then the parts are removed.

A run has an id, in its progress files and in the meta file it publishes. ``resume`` continues
the unfinished run whose progress files it finds, even when finished outputs of an earlier run
are there (an interrupted ``overwrite``); those count as this run's result only when their meta
file has this run's id. A full disk or another write error stops the run with one line; what was
done is kept for ``resume``, as are partial files that turn out to be damaged, which are named.

The job knows the embedder only through ``JobEmbedder``, the few things it needs from one
(``mec_hub.Embedder`` is one); it never imports the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from mec_hub import __version__
from mec_hub.data.featurefile import (
    FORMAT,
    FORMAT_VERSION,
    FeatureFile,
    FeatureMeta,
    features_ends_sha256,
    read_meta_json,
)
from mec_hub.data.images import describe_decoding
from mec_hub.embedding.checkpoint import (
    FINGERPRINT_ARGUMENTS,
    PartState,
    ResumeError,
    append_failures,
    describe_changes,
    fingerprint_digest,
    read_failures,
    sync_file,
    truncate,
)
from mec_hub.embedding.inputs import CollectedInputs, InputError, collect_inputs
from mec_hub.embedding.loader import ImageSource, StringTable
from mec_hub.embedding.npy_writer import NpyRowWriter, read_npy_header
from mec_hub.embedding.outputs import OutputError, OutputFiles, OutputTarget, RunLock, check_output_location
from mec_hub.errors import MecHubError
from mec_hub.progress import progress_enabled
from mec_hub.runtime.distributed import DistEnv, ProcessGroup, batch_aligned_slice, dist_env
from mec_hub.weights.identity import ModelIdentity

if TYPE_CHECKING:
    from mec_hub.embedding.loader import ImageSource
    from mec_hub.embedding.runner import Batch

T = TypeVar("T")


class JobEmbedder(Protocol):
    """What the job needs from an embedder; ``mec_hub.Embedder`` is one."""

    batch_size: int  # images per batch: recorded, and part of what a resume must match
    device: torch.device  # its kind (``.type``) is recorded in the meta file
    transform: Callable[[Any], Any]  # PIL image -> the preprocessed tensor the model takes

    identity: ModelIdentity  # the model: weights, head, dimension, preprocessing

    def record(self) -> dict[str, Any]:
        """The model fields of ``FeatureMeta``: the identity's, then normalize, precision, out_dtype, optimizations."""
        ...

    def prepare(self, source: ImageSource) -> None:
        """Anything to do with the whole input before the first batch (int8's calibration), or nothing."""
        ...

    def batches(self, source: ImageSource, start: int, end: int) -> Iterator[Batch]:
        """Embed ``source[start:end]`` in order, yielding one ``Batch`` per batch."""
        ...


@dataclass(frozen=True)
class Progress:
    """What ``on_commit`` receives after each batch, once its rows, failures and checkpoint are on disk.

    Counts are of this process's share of the images (all of them, unless under torchrun), and
    include what an earlier run did before it was resumed.
    """

    done: int  # images handled, embedded or failed
    total: int
    failed: int


ProgressCallback = Callable[[Progress], None]


class EmbeddingInterrupted(MecHubError):
    """Ctrl-C during a run: what was done is kept, and ``--resume`` continues from there."""


@dataclass
class EmbedResult:
    """What a run wrote: the three files and the meta record (counts, failures, model)."""

    features: Path
    paths: Path
    meta_path: Path
    meta: dict[str, Any] = field(repr=False)
    already_complete: bool = False

    @property
    def num_embedded(self) -> int:
        return int(self.meta["num_embedded"])

    @property
    def num_failed(self) -> int:
        return int(self.meta["num_failed"])

    @property
    def failed(self) -> list[dict[str, str]]:
        return list(self.meta["failed"])

    @property
    def shape(self) -> tuple[int, int]:
        rows, dim = self.meta["shape"]
        return int(rows), int(dim)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def preflight(target: OutputTarget, *, resume: bool, overwrite: bool) -> None:
    """The checks that need no model: a writable place, and no silent clobbering."""
    if resume and overwrite:
        raise OutputError(
            "resume=True and overwrite=True exclude each other: continue the old run, or replace it",
            arguments=("resume", "overwrite"),
        )
    if target.parquet is not None:
        target.parquet.refuse_clobbering(resume=resume, overwrite=overwrite)
    check_output_location(target.files)
    _refuse_clobbering(target.files, resume=resume, overwrite=overwrite)


def _refuse_clobbering(files: OutputFiles, *, resume: bool, overwrite: bool) -> None:
    """Without ``resume`` or ``overwrite``, an unfinished run and finished outputs are left alone."""
    if resume or overwrite:
        return
    if files.part_states():
        raise OutputError(
            f"an unfinished run into {files.npy} was found; pass resume=True to continue it, or overwrite=True to "
            "start over",
            arguments=("resume", "overwrite"),
        )
    existing = files.existing_finals()
    if existing:
        names = ", ".join(p.name for p in existing)
        raise OutputError(
            f"{names} already exist in {files.npy.parent}; pass overwrite=True to replace them",
            arguments=("overwrite",),
        )


def _agreed(group: ProcessGroup, step: Callable[[], T]) -> T:
    """Run ``step`` on every process; if it fails anywhere, fail everywhere with the same message."""
    try:
        value, error = step(), None
    except MecHubError as exc:
        value, error = None, f"{type(exc).__name__}\0{exc}\0{' '.join(exc.arguments)}"
    errors = [e for e in group.all_gather(error) if e]
    if errors:
        kind, rest = errors[0].split("\0", 1)
        message, _, arguments = rest.partition("\0")  # the arguments it names: the CLI spells them as flags
        error_type = ResumeError if kind == "ResumeError" else OutputError
        raise error_type(message, arguments=arguments.split())
    return value  # type: ignore[return-value]


def result_digest(fingerprint: dict[str, Any]) -> str:
    """Digest of what decides the output files: the fingerprint without the number of processes."""
    return fingerprint_digest({k: v for k, v in fingerprint.items() if k != "world_size"})


def make_fingerprint(embedder: JobEmbedder, collected: CollectedInputs, world_size: int) -> dict[str, Any]:
    """Everything that decides the numbers in the output; a resume must match it exactly."""
    record = embedder.record()
    fingerprint = {
        "inputs_sha256": collected.digest(),
        "num_inputs": len(collected),
        "weights_sha256": record["weights_sha256"],
        "state_dict_sha256": record.get("state_dict_sha256"),
        "head": record["head"],
        "embed_dim": record["embed_dim"],
        "preprocessing": record["preprocessing"],
        "precision": record["precision"],
        "normalize": record["normalize"],
        "out_dtype": record["out_dtype"],
        "optimizations": record["optimizations"],
        "batch_size": embedder.batch_size,
        "world_size": world_size,
        "decoding": describe_decoding(),
        "mec_hub_version": __version__,
    }
    # A pooled stage or another runtime (only in the runs that use them: other fingerprints stay as they were).
    fingerprint.update({key: record[key] for key in ("pooling", "runtime") if key in record})
    if "int8" in record:  # the images int8 was calibrated on decide its model
        fingerprint["int8_calibration_sha256"] = record["int8"]["calibration_sha256"]
    return fingerprint


@dataclass
class _Plan:
    kind: str  # "fresh" | "resume" | "complete"
    state: PartState | None = None
    meta: dict[str, Any] | None = None


def _finished_meta(files: OutputFiles) -> dict[str, Any]:
    """The meta record of finished outputs, or ``{}`` when there is none that can be read."""
    try:
        return read_meta_json(files.npy)
    except MecHubError:
        return {}


def _plan(files: OutputFiles, env: DistEnv, fingerprint: dict[str, Any], *, resume: bool, overwrite: bool) -> _Plan:
    """Decide, without changing anything, whether this process starts, resumes or has nothing to do."""
    if overwrite:
        return _Plan("fresh")
    _refuse_clobbering(files, resume=resume, overwrite=overwrite)  # again: things may have changed since preflight
    if not resume:
        return _Plan("fresh")
    states = files.part_states()
    if states:
        # An unfinished run: it wins over any finished outputs, which may be older ones it was replacing.
        suffix = f"-of-{env.world_size}.state.json"
        others = sorted({s.name.rsplit("-of-", 1)[1].split(".")[0] for s in states if not s.name.endswith(suffix)})
        if others:
            raise ResumeError(
                f"the unfinished run used {' or '.join(others)} process(es), this one {env.world_size}; resume it "
                "with the same number (torchrun --nproc_per_node), or pass overwrite=True to start over",
                arguments=("overwrite",),
            )
        run_id = PartState.load(states[0]).run_id  # any process's: a run's processes share it
        meta = _finished_meta(files)
        if run_id and meta.get("run_id") == run_id and len(files.existing_finals()) == 3:
            return _Plan("complete", meta=meta)  # published by this run; only (part of) the cleanup was left
        mine = files.part(env.rank, env.world_size)
        state = PartState.load(mine.state)
        changes = describe_changes(state.fingerprint, fingerprint)
        if changes:
            raise ResumeError(
                f"cannot resume the unfinished run into {files.npy.name}: "
                + "; ".join(changes)
                + ". Run it with the same inputs and options, or pass overwrite=True to start over.",
                arguments=(*FINGERPRINT_ARGUMENTS, "overwrite"),
            )
        published = state.publishing is not None  # the first process's .npy may be in place already
        if not mine.failed.exists() or not (mine.data.exists() or published):
            raise ResumeError(
                f"the partial files of the unfinished run ({mine.data}) are missing; pass overwrite=True",
                arguments=("overwrite",),
            )
        return _Plan("resume", state=state)
    finals = files.existing_finals()
    meta = _finished_meta(files)
    if len(finals) == 3 and meta and meta.get("fingerprint") == result_digest(fingerprint):
        return _Plan("complete", meta=meta)  # done before
    if finals:
        raise OutputError(
            f"{files.npy.name} was made by a run with other inputs or options; pass overwrite=True to replace it",
            arguments=("overwrite",),
        )
    return _Plan("fresh")


def _remove_parts(files: OutputFiles) -> None:
    for path in files.all_part_files():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _writing(folder: Path) -> Any:
    """Writing the outputs in ``folder``: a failure (a full disk, a quota, an I/O error) stops the run
    with one line. The progress files still name what is safely on disk, so ``resume`` goes on from there."""
    try:
        yield
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        raise OutputError(
            f"{exc.filename or folder}: {exc.strerror or exc}. The run stopped and the work done so far is kept: "
            f"{'free some space' if full else 'fix that'}, then run it again with resume=True",
            arguments=("resume",),
        ) from None


def _damaged(path: Path, exc: BaseException) -> ResumeError:
    return ResumeError(
        f"{path}, a partial file of the unfinished run, is damaged ({exc}); start over with overwrite=True",
        arguments=("overwrite",),
    )


def _reopen(path: Path, dim: int, dtype: str, rows: int) -> NpyRowWriter:
    """A part file, cut back to its checkpointed ``rows``, ready to take more."""
    try:
        return NpyRowWriter.open_for_resume(path, dim, dtype, rows)
    except ValueError as exc:
        raise _damaged(path, exc) from None


def _embed_slice(
    embedder: JobEmbedder,
    model_fields: dict[str, Any],
    source: ImageSource,
    part: Any,
    state: PartState,
    *,
    show_progress: bool,
    label: str = "embedding",
    on_commit: ProgressCallback | None = None,
) -> None:
    """Embed ``source[state.items_done:state.end]``, checkpointing after every batch."""
    dim, dtype = model_fields["embed_dim"], model_fields["out_dtype"]
    folder = part.data.parent
    with _writing(folder):
        if state.rows_done == 0 and state.items_done == state.start and state.publishing is None:
            NpyRowWriter.create(part.data, dim, dtype).close()
            part.failed.write_bytes(b"")
            state.save(part.state)
        if state.complete:
            return  # what is left is _finalize's
        num_failed = len(read_failures(part.failed, state.failed_bytes))
        writer = _reopen(part.data, dim, dtype, state.rows_done)
        truncate(part.failed, state.failed_bytes)
        failed_log = open(part.failed, "ab")  # noqa: SIM115
    bar = tqdm(
        total=state.end - state.start,
        initial=state.items_done - state.start,
        unit="img",
        desc=label,
        disable=not show_progress,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.05,
    )

    try:
        for batch in embedder.batches(source, state.items_done, state.end):
            # Rows and failures to disk and synced, then (only then) the checkpoint that counts them.
            with _writing(folder):
                writer.append(batch.features)
                append_failures(failed_log, batch.failures)
                writer.sync()
                sync_file(failed_log)
                bar.update(batch.end - state.items_done)
                state.items_done, state.rows_done, state.failed_bytes = batch.end, writer.rows, failed_log.tell()
                state.save(part.state)
            if batch.failures:
                num_failed += len(batch.failures)
                bar.set_postfix(failed=num_failed, refresh=False)
            if on_commit is not None:
                on_commit(Progress(state.items_done - state.start, state.end - state.start, num_failed))
    except KeyboardInterrupt:
        raise EmbeddingInterrupted(
            f"interrupted: {state.items_done - state.start} of {state.end - state.start} images done and kept; "
            "run it again with resume=True to continue",
            arguments=("resume",),
        ) from None
    finally:
        bar.close()
        # Unsynced bytes are past the checkpoint anyway; a full disk must not hide the first error.
        with contextlib.suppress(OSError):
            failed_log.close()
        with contextlib.suppress(OSError):
            writer.close()


def image_source(collected: CollectedInputs, transform: Callable[[Any], Any]) -> ImageSource:
    """The inputs as the dataset the embedder reads (row i = ``collected.items[i]``)."""
    items = collected.items
    return ImageSource(StringTable([it.path for it in items]), transform, names=StringTable([it.name for it in items]))


def _build_meta(
    embedder: JobEmbedder,
    model_fields: dict[str, Any],
    collected: CollectedInputs,
    files: OutputFiles,
    *,
    rows: int,
    failures: list[tuple[int, str]],
    fingerprint: dict[str, Any],
    recursive: bool,
    started_at: str,
    run_id: str,
) -> FeatureMeta:
    record: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "features": files.npy.name,
        "paths": files.paths_txt.name,
        "shape": [rows, model_fields["embed_dim"]],
        "run_id": run_id,
    }
    record.update(model_fields)
    record.update(
        num_inputs=len(collected),
        num_embedded=rows,
        num_failed=len(failures),
        num_skipped_non_images=collected.skipped,
        failed=[{"path": collected.items[i].name, "reason": reason} for i, reason in failures],
        # tar members that are not regular files (symlink, folder, device, FIFO, hard link to nothing):
        # counted in num_skipped_non_images, listed here with their reason
        skipped=[{"path": name, "reason": reason} for name, reason in collected.skipped_members],
        inputs=collected.sources,
        files_from=collected.files_from,
        recursive=recursive,
        base_dir=collected.base_dir,
        batch_size=embedder.batch_size,
        device=embedder.device.type,
        decoding=fingerprint["decoding"],
        fingerprint=result_digest(fingerprint),
        mec_hub_version=__version__,
        torch_version=torch.__version__,
        started_at=started_at,
        finished_at=_now(),
    )
    return FeatureMeta.from_json(record, origin="the embedder's record")


def _finalize(
    embedder: JobEmbedder,
    model_fields: dict[str, Any],
    collected: CollectedInputs,
    files: OutputFiles,
    env: DistEnv,
    fingerprint: dict[str, Any],
    *,
    recursive: bool,
) -> dict[str, Any]:
    """Join the parts into the first one and publish the set (``.meta.json`` last); see the module docstring."""
    parts = [files.part(rank, env.world_size) for rank in range(env.world_size)]
    states = [PartState.load(p.state) for p in parts]
    unfinished = [rank for rank, s in enumerate(states) if not s.complete]
    if unfinished:
        raise ResumeError(
            f"process(es) {unfinished} did not finish their share; run again with resume=True", arguments=("resume",)
        )
    failures: list[tuple[int, str]] = []
    for part, state in zip(parts, states, strict=True):
        failures.extend(read_failures(part.failed, state.failed_bytes))
    first, dim, dtype = parts[0], model_fields["embed_dim"], model_fields["out_dtype"]
    if first.data.exists():
        writer = _reopen(first.data, dim, dtype, states[0].rows_done)
        try:
            for part, state in zip(parts[1:], states[1:], strict=True):
                try:
                    writer.append_file_rows(part.data, state.rows_done)
                except (ValueError, FileNotFoundError) as exc:
                    raise _damaged(part.data, exc) from None
        except BaseException:
            writer.close()
            raise
        writer.finish()
        rows, features_file = writer.rows, first.data
        # Recorded before the rename, so that a resume after it recognises the file in its new place.
        states[0].publishing = features_ends_sha256(first.data)
        states[0].save(first.state)
    elif states[0].publishing and files.npy.is_file() and features_ends_sha256(files.npy) == states[0].publishing:
        rows, features_file = read_npy_header(files.npy)[0], None  # renamed into place by the run that stopped
    else:
        raise ResumeError(
            f"the partial files of the unfinished run ({first.data}) are missing; pass overwrite=True",
            arguments=("overwrite",),
        )
    failed_indices = {index for index, _ in failures}
    if rows != len(collected) - len(failed_indices):
        raise MecHubError(
            f"internal error: {rows} rows for {len(collected)} inputs with {len(failed_indices)} failures"
        )

    meta = _build_meta(
        embedder,
        model_fields,
        collected,
        files,
        rows=rows,
        failures=failures,
        fingerprint=fingerprint,
        recursive=recursive,
        started_at=min(s.started_at for s in states),
        run_id=states[0].run_id,
    )
    names = (item.name for index, item in enumerate(collected.items) if index not in failed_indices)
    FeatureFile.write(files.npy, names, meta, features_file=features_file)
    _remove_parts(files)
    return meta.to_json()


def run_job(
    embedder: JobEmbedder,
    inputs: Any,
    out: str | os.PathLike[str],
    *,
    files_from: str | os.PathLike[str] | None = None,
    recursive: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    on_commit: ProgressCallback | None = None,
    shard_rows: int | None = None,
) -> EmbedResult:
    """Embed the images named by ``inputs`` (folders, files, globs, or a ``CollectedInputs``) into ``out``.

    Writes ``out`` (``.npy``, N x D), ``.paths.txt`` (line i = image of row i) and ``.meta.json``
    (model, options, counts, failures); for an ``out`` ending in ``.parquet``, one Parquet file
    (columns ``path`` and ``embedding``, the meta in its key-value metadata) or, with
    ``shard_rows``, ``FEATS-00000-of-000NN.parquet`` ... of at most that many rows each, converted
    from a hidden ``.npy`` set once it is complete. Files that cannot be read are skipped and listed in the
    meta file with a reason. ``resume`` continues an interrupted run with the same inputs and
    options; ``overwrite`` replaces existing outputs (only once the new ones are complete).
    ``progress``: show a progress bar (default: when stderr is a terminal). ``on_commit``: called
    with a ``Progress`` after every batch, once it is saved; an exception it raises stops the run
    with the work so far kept for ``resume`` (``KeyboardInterrupt`` becomes ``EmbeddingInterrupted``).
    Under torchrun each process embeds its own slice (and calls its own ``on_commit``) and the
    first one writes the files.
    """
    target = OutputTarget.for_out(out, shard_rows)
    files = target.files
    env = dist_env()
    preflight(target, resume=resume, overwrite=overwrite)
    if isinstance(inputs, CollectedInputs):
        collected = inputs
    else:
        collected = collect_inputs(inputs, files_from=files_from, recursive=recursive)
    if not collected.items:
        skipped = f" ({collected.skipped} file(s) or tar member(s) not images, left out)" if collected.skipped else ""
        where = ", ".join([*collected.sources, *([collected.files_from] if collected.files_from else [])])
        raise InputError(f"no image files found in {where}{skipped}")
    group = ProcessGroup(env)
    lock = RunLock(files)
    try:
        source = image_source(collected, embedder.transform)  # every path packed once, for the whole run
        embedder.prepare(source)  # before its record is made
        model_fields = embedder.record()
        fingerprint = make_fingerprint(embedder, collected, env.world_size)
        digests = group.all_gather(fingerprint_digest(fingerprint))
        if len(set(digests)) > 1:
            raise MecHubError(
                "the processes of this run see different inputs or options (is every input folder "
                "reachable under the same path on every node?)"
            )
        if env.is_main:
            _agreed(group, lock.acquire)
        else:
            _agreed(group, lambda: None)
        plan = _agreed(group, lambda: _plan(files, env, fingerprint, resume=resume, overwrite=overwrite))
        if plan.kind == "complete":
            if env.is_main:
                _remove_parts(files)
            group.barrier()
            assert plan.meta is not None
            result = EmbedResult(files.npy, files.paths_txt, files.meta_json, plan.meta, already_complete=True)
            return _published(result, target, env)
        if overwrite and env.is_main:
            _remove_parts(files)
        group.barrier()

        start, end = batch_aligned_slice(len(collected), embedder.batch_size, env.rank, env.world_size)
        if plan.state is None:
            run_id = group.broadcast_from_main(uuid.uuid4().hex if env.is_main else None)
            state = PartState(fingerprint, start, end, start, 0, 0, _now(), run_id=run_id)
        else:
            state = plan.state
        if (state.start, state.end) != (start, end):
            raise ResumeError(f"the saved progress covers items {state.start}..{state.end}, expected {start}..{end}")
        show = progress_enabled(progress) and env.is_main
        label = "embedding" if env.world_size == 1 else f"embedding (process 1 of {env.world_size}, its share)"
        _embed_slice(
            embedder,
            model_fields,
            source,
            files.part(env.rank, env.world_size),
            state,
            show_progress=show,
            label=label,
            on_commit=on_commit,
        )

        group.barrier()
        outcome: Any = None
        if env.is_main:
            try:
                with _writing(files.npy.parent):
                    outcome = _finalize(embedder, model_fields, collected, files, env, fingerprint, recursive=recursive)
            except BaseException as exc:
                group.broadcast_from_main(str(exc) or type(exc).__name__)
                raise
            group.broadcast_from_main(outcome)
        else:
            outcome = group.broadcast_from_main(None)
            if isinstance(outcome, str):
                raise MecHubError(f"the first process could not write the outputs: {outcome}")
        return _published(EmbedResult(files.npy, files.paths_txt, files.meta_json, outcome), target, env)
    finally:
        lock.release()  # after the last rename: no other run takes the outputs while they are published
        group.close()


def _published(result: EmbedResult, target: OutputTarget, env: DistEnv) -> EmbedResult:
    """The result as published: the ``.npy`` set itself, or the Parquet file(s) made from it."""
    if target.parquet is None or not result.num_embedded:
        return result
    if not env.is_main:
        return dataclasses.replace(result, features=target.parquet.path, paths=target.parquet.path,
                                   meta_path=target.parquet.path)
    written = target.parquet.publish()
    shown = written[0] if len(written) == 1 else written[0].with_name(f"{written[0].name} ... {written[-1].name}")
    return dataclasses.replace(result, features=shown, paths=written[0], meta_path=written[0])
