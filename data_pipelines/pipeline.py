"""The shard job: scan inputs, shard what is not done yet, write manifest / rejects / stats.

Resuming: sources already in a finished shard (one with a valid progress record) are
skipped. The rest fall into runs of consecutive inputs (in sorted order) between finished
shards; each run is packed greedily from a fresh shard, and new shards take the lowest free
indices. Since finished shards begin and end on the boundaries the uninterrupted job would
have used, a resumed job writes the same shards, byte for byte, and never doubles a sample.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm import tqdm

from data_pipelines.annotators import describe
from data_pipelines.captions import file_digest, load_captions
from data_pipelines.config import ShardConfig, output_fingerprint
from data_pipelines.progress import (
    SHARD_DIR,
    LiveStatus,
    ShardRecord,
    load_records,
    save_record,
)
from data_pipelines.samples import SourceResult, process_source
from data_pipelines.stats import build_stats
from data_pipelines.workload import plan_for
from data_pipelines.writer import TarShard, shard_file_name, write_if_changed
from omni_train.contracts import CONDITIONS

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm"})
MISSING_VALUES = ("", "???")
PARTS_DIR = "parts"


def part_dir(output_dir: Path, partition: int, num_partitions: int) -> Path:
    return output_dir / PARTS_DIR / f"part_{partition:04d}-of-{num_partitions:04d}"


def check_dirs(cfg: ShardConfig) -> tuple[Path, Path]:
    """Resolved (input_dir, output_dir); raises ValueError naming the key and the fix."""
    for key, what in (
        ("input_dir", "the folder of videos to shard"),
        ("output_dir", "where shards, manifest, rejects and stats go"),
    ):
        if str(getattr(cfg, key)) in MISSING_VALUES:
            raise ValueError(f"{key} is required: pass {key}=DIR ({what})")
    input_dir, output_dir = Path(cfg.input_dir).resolve(), Path(cfg.output_dir).resolve()
    if not input_dir.is_dir():
        raise ValueError(
            f"input_dir={cfg.input_dir} is not an existing folder: pass "
            "input_dir=DIR pointing at the videos to shard"
        )
    if output_dir == input_dir:
        raise ValueError(
            f"output_dir={cfg.output_dir} is the input folder: pass a separate output_dir=DIR"
        )
    for key in ("fps", "clip_seconds", "min_clip_seconds"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"{key}={getattr(cfg, key)} must be positive")
    if cfg.num_partitions < 1 or not 0 <= cfg.partition < cfg.num_partitions:
        raise ValueError(
            f"partition={cfg.partition} num_partitions={cfg.num_partitions}: need "
            "num_partitions >= 1 and 0 <= partition < num_partitions (slurm: "
            "partition=$SLURM_ARRAY_TASK_ID num_partitions=$SLURM_ARRAY_TASK_COUNT)"
        )
    if cfg.min_clip_seconds > cfg.clip_seconds:
        raise ValueError(
            f"min_clip_seconds={cfg.min_clip_seconds} exceeds "
            f"clip_seconds={cfg.clip_seconds}: lower min_clip_seconds"
        )
    return input_dir, output_dir


def scan_inputs(input_dir: Path, exclude: Path | None = None) -> list[str]:
    """Video files under input_dir (any depth, suffix case-insensitive), as sorted posix
    paths relative to input_dir; files under ``exclude`` are skipped."""
    found = []
    for path in input_dir.rglob("*"):
        if path.suffix.lower() not in VIDEO_SUFFIXES or not (path.is_file() or path.is_symlink()):
            continue
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue
        found.append(path.relative_to(input_dir).as_posix())
    return sorted(found)


def pending_runs(sources: list[str], done: set[str]) -> list[list[str]]:
    """Maximal runs of consecutive sources that no finished shard holds."""
    runs: list[list[str]] = [[]]
    for source in sources:
        if source in done:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(source)
    return [run for run in runs if run]


class ShardPacker:
    """Fills shards greedily with whole sources; records each shard once it is in place."""

    def __init__(
        self,
        output_dir: Path,
        input_dir: Path,
        cfg: ShardConfig,
        settings: dict,
        records: dict[int, ShardRecord],
    ) -> None:
        self.output_dir, self.input_dir, self.cfg = output_dir, input_dir, cfg
        self.settings, self.records = settings, records
        self.shard: TarShard | None = None
        self.index = -1
        self._reset()

    def _reset(self) -> None:
        self.sources: dict[str, int] = {}
        self.rows: list[dict] = []
        self.rejects: list[dict] = []
        self.payload_bytes = 0

    def add(self, result: SourceResult) -> None:
        size = sum(sample.size for sample in result.samples)
        if self.shard is not None and (
            len(self.rows) + len(result.samples) > self.cfg.max_samples_per_shard
            or self.payload_bytes + size > self.cfg.max_shard_bytes
        ):
            self.finish()
        if self.shard is None:
            # The lowest free index: shards rebuilt after a crash keep their old names.
            self.index = next(i for i in range(len(self.records) + 1) if i not in self.records)
            self.shard = TarShard(self.output_dir / SHARD_DIR / shard_file_name(self.index))
        relative = f"{SHARD_DIR}/{self.shard.path.name}"
        for sample in result.samples:
            self.shard.add(sample.key, sample.members())
            meta = sample.meta
            self.rows.append({
                "key": sample.key, "shard": relative, "source": result.source,
                "clip_index": meta["clip_index"], "start": meta["start"], "end": meta["end"],
                "quality": {c: meta["quality"][c] for c in CONDITIONS},
            })  # fmt: skip
        self.sources[result.source] = (self.input_dir / result.source).stat().st_size
        self.rejects += result.rejects
        self.payload_bytes += size

    def finish(self) -> None:
        if self.shard is None:
            return
        num_bytes = self.shard.finish()
        record = ShardRecord(
            index=self.index,
            shard=f"{SHARD_DIR}/{self.shard.path.name}",
            bytes=num_bytes,
            sources=self.sources,
            samples=self.rows,
            rejects=self.rejects,
            settings=self.settings,
        )
        save_record(self.output_dir, record)
        self.records[self.index] = record
        log.debug("finished %s: %d samples", record.shard, len(record.samples))
        self.shard = None
        self._reset()

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()
            self.shard = None


Job = tuple[Path, str, ShardConfig, str | None, bool]  # process_source's arguments


def _jobs(
    sources: list[str], input_dir: Path, cfg: ShardConfig, captions: dict[str, str]
) -> list[Job]:
    # Spooled: a source's clips wait on disk, not in memory, until the shard writer takes them.
    return [(input_dir / source, source, cfg, captions.get(source), True) for source in sources]


def _results(
    sources: list[str],
    input_dir: Path,
    cfg: ShardConfig,
    pool: WorkerPool | None,
    captions: dict[str, str] | None = None,
) -> Iterator[SourceResult]:
    """process_source over ``sources``, in order, a few sources ahead when pooled."""
    jobs = _jobs(sources, input_dir, cfg, captions or {})
    if pool is None:
        for job in jobs:
            yield process_source(*job)
        return
    yield from pool.results(jobs)


class WorkerPool:
    """process_source in spawned worker processes, results in input order.

    A worker that dies (a segfault in a codec, the OOM killer) breaks a ProcessPoolExecutor:
    every source in flight then fails with BrokenProcessPool. The pool is recreated; results
    that had arrived are kept, and each other source in flight runs again alone in a
    process of its own, so the one that kills its process is found and becomes a
    ``worker_crashed`` reject with the signal or exit code, while the rest are sharded as
    if nothing had happened.
    """

    def __init__(self, workers: int) -> None:
        # spawn, not fork: a fork of a process whose model runtimes (TFLite, torch) have
        # started threads can hang or die in the child.
        self.context = multiprocessing.get_context("spawn")
        self.workers = workers
        self.executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=self.context, initializer=_one_thread)

    def shutdown(self) -> None:
        self.executor.shutdown(cancel_futures=True)

    def results(self, jobs: list[Job]) -> Iterator[SourceResult]:
        queue = deque(jobs)
        ahead: deque[tuple[Job, Future | None]] = deque()
        while queue or ahead:
            self._fill(ahead, queue)
            job, future = ahead.popleft()
            result = _result_unless_broken(future)
            if result is not None:
                yield result
                continue
            in_flight = [(job, future), *ahead]
            ahead.clear()
            log.warning(
                "a worker process died; re-running the %d sources in flight one at a time",
                len(in_flight),
            )
            self.shutdown()
            self.executor = self._new_executor()
            for suspect, done in in_flight:
                yield _delivered(done) or self._run_alone(suspect)

    def _fill(self, ahead: deque, queue: deque) -> None:
        while queue and len(ahead) < 2 * self.workers:
            job = queue.popleft()
            try:
                # process_source is looked up here, so a test may replace it in this module.
                ahead.append((job, self.executor.submit(process_source, *job)))
            except BrokenProcessPool:
                ahead.append((job, None))
                return

    def _run_alone(self, job: Job) -> SourceResult:
        receiver, sender = self.context.Pipe(duplex=False)
        child = self.context.Process(target=_run_in_child, args=(sender, process_source, job))
        child.start()
        sender.close()
        try:
            outcome = receiver.recv()
        except EOFError:  # the child died before it could answer
            outcome = None
        finally:
            receiver.close()
        child.join()
        if outcome is None:
            return crashed_result(job[1], child.exitcode)
        kind, value = outcome
        if kind == "error":
            raise value
        return value


def _result_unless_broken(future: Future | None) -> SourceResult | None:
    """The future's result; None when its pool broke (other exceptions propagate)."""
    if future is None:
        return None
    try:
        return future.result()
    except BrokenProcessPool:
        return None


def _delivered(future: Future | None) -> SourceResult | None:
    """The result of a future that completed before its pool broke, else None."""
    if future is None or not future.done() or future.cancelled():
        return None
    return None if future.exception() is not None else future.result()


def _run_in_child(sender, function, job: Job) -> None:
    _one_thread()
    try:
        sender.send(("ok", function(*job)))
    except BaseException as err:  # noqa: BLE001 - handed to the parent, which raises it
        sender.send(("error", err))
    finally:
        sender.close()


def crashed_result(source: str, exitcode: int | None) -> SourceResult:
    """The reject of a source whose process died while it was processed."""
    if exitcode is not None and exitcode < 0:
        try:
            how = f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"signal {-exitcode}"
    else:
        how = f"exit code {exitcode}"
    detail = f"the worker process died on this input ({how}); the job went on without it"
    log.error("%s: %s", source, detail)
    return SourceResult(
        source, rejects=[{"source": source, "reason": "worker_crashed", "detail": detail}]
    )


def _one_thread() -> None:
    """Worker start-up: one thread per math library, since the workers are the parallelism."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"
    bound_heap()


CLIP_ARRAY_BYTES = 8 << 20  # a clip's frames, planes, grey: allocated and freed per clip


def bound_heap() -> bool:
    """Keep arrays of CLIP_ARRAY_BYTES or more out of the C heap (glibc; a no-op elsewhere).

    glibc raises its mmap threshold to the size of each large block freed, so after the first
    clip every clip's tens of MB come from the heap, which fragments: peak RSS then climbed
    ~15 % over the first minutes of a long source before levelling off. A fixed threshold
    returns each clip's arrays to the system when the clip is done (measured: ~4 % more CPU
    for page faults, peak RSS flat from the first clip)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, CLIP_ARRAY_BYTES))


def run_shard(cfg: ShardConfig) -> dict:
    """Shard ``cfg.input_dir`` into ``cfg.output_dir``; returns the stats (also in stats.json)."""
    input_dir, output_dir = check_dirs(cfg)
    settings = output_fingerprint(cfg)
    # "auto" backends depend on the installed packages: a resumed job must resolve the same.
    settings.update({f"resolved.{k}": v for k, v in describe(cfg.annotators).items()})
    captions: dict[str, str] = {}
    if cfg.captions:
        manifest = Path(cfg.captions).resolve()
        captions = load_captions(manifest, input_dir)
        settings["captions_sha1"] = file_digest(manifest)
    sources = scan_inputs(input_dir, exclude=output_dir)
    if cfg.num_partitions > 1:
        plan = plan_for(output_dir / PARTS_DIR, input_dir, sources, cfg.num_partitions)
        sources = plan.sources_of(cfg.partition, sources)
        output_dir = part_dir(output_dir, cfg.partition, cfg.num_partitions)
    records = load_records(output_dir, input_dir, settings)
    done = {source for record in records.values() for source in record.sources}
    runs = pending_runs(sources, done)
    todo = sum(len(run) for run in runs)
    log.info(
        "%d inputs in %s: %d already sharded, %d to process",
        len(sources),
        input_dir,
        len(sources) - todo,
        todo,
    )

    input_rejects: list[dict] = []
    packer = ShardPacker(output_dir, input_dir, cfg, settings, records)
    live = LiveStatus(output_dir, total=len(sources), done=len(sources) - todo)
    pool = WorkerPool(cfg.workers) if cfg.workers > 1 and todo > 1 else None
    if pool is None:
        bound_heap()  # the workers do it at start-up
    clips, started = 0, time.perf_counter()
    try:
        if todo:
            live.write(force=True)
        with tqdm(total=todo, desc="shard", unit="video", disable=not cfg.progress) as bar:
            for run in runs:
                for result in _results(run, input_dir, cfg, pool, captions):
                    try:
                        if result.samples:
                            packer.add(result)
                        else:
                            input_rejects += result.rejects
                    finally:
                        result.release()
                    clips += len(result.samples)
                    live.source_done(result.source, len(result.samples), result.rejects)
                    elapsed = max(1e-9, time.perf_counter() - started)
                    bar.set_postfix(clips=clips, clips_per_s=f"{clips / elapsed:.2f}")
                    bar.update(1)
                packer.finish()
    except BaseException as err:
        packer.abort()
        if todo:
            live.stopped(type(err).__name__)
        raise
    finally:
        if pool is not None:
            pool.shutdown()

    _remove_leftovers(output_dir, records)
    manifest = [row for index in sorted(records) for row in records[index].samples]
    rejects = input_rejects + [row for record in records.values() for row in record.rejects]
    stats = write_outputs(
        output_dir, len(sources), manifest, rejects, len(records),
        sum(record.bytes for record in records.values()),
    )  # fmt: skip
    live.finished()
    elapsed = time.perf_counter() - started
    if todo:
        log.info("%d clips from %d inputs in %.1f s (%.2f clips/s)", clips, todo, elapsed,
                 clips / max(elapsed, 1e-9))  # fmt: skip
    return stats


def write_outputs(
    output_dir: Path,
    num_inputs: int,
    manifest: list[dict],
    rejects: list[dict],
    num_shards: int,
    shard_bytes: int,
) -> dict:
    """manifest.jsonl, rejects.jsonl (sorted by source, then clip start) and stats.json, each
    rewritten only when its bytes change; returns the stats."""
    rejects = sorted(rejects, key=lambda row: (row["source"], row.get("start", -1.0)))
    stats = build_stats(num_inputs, manifest, rejects, num_shards, shard_bytes)
    write_if_changed(output_dir / "manifest.jsonl", _jsonl(manifest))
    write_if_changed(output_dir / "rejects.jsonl", _jsonl(rejects))
    write_if_changed(
        output_dir / "stats.json",
        (json.dumps(stats, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
    )
    return stats


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _remove_leftovers(output_dir: Path, records: dict[int, ShardRecord]) -> None:
    """Temp files and shards without a record, left by an interrupted job (they would
    otherwise be read twice or half)."""
    shard_dir = output_dir / SHARD_DIR
    kept = {(output_dir / record.shard).name for record in records.values()}
    for path in sorted(shard_dir.glob("*.tmp")) + sorted(shard_dir.glob("shard-*.tar")):
        if path.name not in kept:
            log.info("removing %s (left by an interrupted run)", path)
            path.unlink()
