"""The commands that look at caches and move them between formats: ``info``, ``ls``, ``verify``,
``import`` and ``export`` (registered on the app by :mod:`kdcache.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer

from ..errors import KdcacheError
from .options import MAX_LENGTH, TEXT_COLUMN, TOKENIZER, read_dataset
from .output import echo

__all__ = ["COMMANDS"]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _accuracy(meta: Any) -> str:
    """The teacher's recorded accuracy on the labelled rows, flagged when at chance; "" when
    there is none (no labels, or a regression target)."""
    acc = meta.teacher_accuracy
    if meta.regression or acc is None or not acc.labelled:
        return ""
    chance = (f" AT CHANCE (1/{meta.vocab.real} = {1 / meta.vocab.real:.3f}): an untrained teacher? "
              "(dumped without --checkpoint?)" if meta.teacher_at_chance else "")
    return f"{acc.accuracy:.4f} ({acc.correct}/{acc.labelled}){chance}"


def info_cmd(path: str = typer.Argument(..., help="A cache directory or URL.")) -> None:
    """Describe a cache: rows, outputs (shape, dtype, bytes), fingerprint, teacher, completeness."""
    from ..store import TeacherCache, dump_in_progress

    cache = TeacherCache.open(path)
    meta = cache.meta
    sizes = cache.nbytes_on_disk()
    state = "complete" if cache.complete else ("dump in progress" if dump_in_progress(path) else "INCOMPLETE")
    lines = [f"cache        {path}",
             f"state        {state} ({int(cache.blocks_record()[:, 0].sum())}/{cache.n_blocks} blocks)",
             f"fingerprint  {cache.fingerprint}",
             f"rows         {cache.rows}  (block {cache.block_rows} rows)",
             f"teacher      {meta.teacher.spec or meta.teacher.class_name}  weights {meta.teacher.weights_digest}",
             f"checkpoint   {meta.teacher.checkpoint or 'none (the teacher as its spec builds it)'}",
             f"dataset      {meta.dataset.spec or '?'}  length {meta.dataset.length}  digest {meta.dataset.digest}"]
    tokens = meta.tokens or cache.rows
    for name, o in cache.outputs.items():
        codec = o.codec.params()
        what = codec["dtype"] if codec["name"] == "dense" else " ".join(f"{k}={v}" for k, v in codec.items())
        size = o.shape[-1] if o.shape else 1
        kind = (f"output {meta.output_key}, {size} dims (a regression target: --objective mse or cosine)"
                if meta.regression else f"{meta.vocab.real} classes") if name == "logits" else f"{size} dims"
        lines.append(f"  {name}: {kind}; shape ({cache.rows}, {', '.join(map(str, o.shape))})  {what}")
        for a in o.arrays.values():
            # what the rows hold, not the files: the last chunk is stored whole, zero-padded
            per = (f"{a.row_bytes} B/token" if a.per_token else
                   f"{a.row_bytes * cache.rows / tokens:.1f} B/token" if meta.mask_key or tokens != cache.rows
                   else f"{a.row_bytes} B/row")
            # a packed array has one entry per real token, not per row
            length, unit = (tokens, "tokens") if a.per_token else (cache.rows, "rows")
            lines.append(f"    {a.path:<24} {(length, *a.shape)} {a.dtype}  {per}  chunk {a.chunk_rows} {unit}  "
                         f"{_size(sizes[a.path])} on disk")
        for c in o.constants.values():  # a head cache's output layer: stored once, not per row
            lines.append(f"    {c.path:<24} {c.shape} {c.dtype}  stored once  chunk {c.chunk_rows} rows  "
                         f"{_size(sizes[c.path])} on disk")
    masked = f"padding masked by inputs[{meta.mask_key!r}], {tokens} real tokens" if meta.mask_key else ""
    if meta.regression and masked:
        lines.append(f"tokens       {masked}")
    elif not meta.regression and (meta.vocab.real != meta.vocab.padded or meta.mask_key):
        lines.append(f"vocabulary   {meta.vocab.real} classes (output layer {meta.vocab.padded})"
                     + (f"; {masked}" if masked else ""))
    if cache.seed is not None:
        lines.append(f"views        {cache.views} per sample (row = sample * {cache.views} + view), seed {cache.seed}"
                     + (f", explicit parameters {list(meta.view_params_shape)}" if meta.view_params_shape else ""))
    if meta.source is not None:
        normalised = {"vocabulary": "normalised over the vocabulary", "kept": "normalised over the kept ids"}
        lines.append(f"source       imported from {meta.source.get('format')} {meta.source.get('file') or ''}  "
                     f"(log-probabilities {normalised.get(meta.source.get('normalized'), 'of unknown normalisation')})")
    if meta.packed is not None:
        lines.append(f"layout       packed: {meta.tokens or 0} real tokens stored on a token axis of "
                     f"{meta.packed.capacity} (chunks of {meta.packed.chunk} tokens); padding is not stored")
    accuracy = _accuracy(meta)
    if accuracy:
        lines.append(f"teacher accuracy on the transfer set's labels: {accuracy}")
    if meta.dump is not None and meta.dump.rows_per_s is not None:
        lines.append(f"dump         {meta.dump.rows_per_s:.0f} rows/s, {meta.dump.mb_per_s} MB/s on {meta.dump.device}")
    lines.append("versions     " + " ".join(f"{k} {v}" for k, v in meta.versions.items()))
    echo("\n".join(lines))


def ls_cmd(root: Optional[str] = typer.Argument(None, help="Cache root, a directory or URL "
                                                             "[$KDCACHE_HOME or ./kdcache-store].")) -> None:
    """List the caches under a root, one line each."""
    from ..dump import default_cache_root
    from ..store import TeacherCache, list_dir

    root = str(root or default_cache_root())
    entries = list_dir(root)
    if entries is None:
        raise KdcacheError(f"cache root {root} does not exist")
    found = 0
    for entry in entries:
        if not TeacherCache.exists(entry):
            continue
        try:
            cache = TeacherCache.open(entry)
        except KdcacheError as err:
            echo(f"{entry}  unreadable: {err}")
            continue
        found += 1
        outputs = ",".join(a.path for o in cache.outputs.values() for a in o.arrays.values())
        teacher = cache.meta.teacher
        size = sum(cache.nbytes_on_disk().values())
        accuracy = _accuracy(cache.meta)
        echo(f"{entry}  {'complete' if cache.complete else 'incomplete'}  {cache.rows} rows  {outputs}  "
             f"{_size(size)}  teacher {teacher.spec or teacher.class_name}  checkpoint {teacher.checkpoint or 'none'}"
             + (f"  accuracy {accuracy}" if accuracy else ""))
    if not found:
        echo(f"no caches under {root}", err=True)


def verify_cmd(
    path: str = typer.Argument(..., help="A cache directory or URL."),
    replay: int = typer.Option(0, help="Also regenerate N random rows' inputs (views replayed from their seeds, no "
                                      "teacher) and check they hash to what the dump recorded."),
    dataset: Optional[str] = typer.Option(None, help="Dataset spec for --replay (required with it; the spec a cache records is shown, never run)."),
    dataset_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for --dataset."),
    text_column: Optional[str] = TEXT_COLUMN,
    max_length: Optional[int] = MAX_LENGTH,
    tokenizer: Optional[str] = TOKENIZER,
) -> None:
    """Read every chunk and report each missing or corrupt one with its row range (exit 1 if any)."""
    from ..store import TeacherCache

    cache = TeacherCache.open(path)
    if replay > 0 and not dataset:
        # a cache from elsewhere names code: show it, never import or call it
        recorded = cache.meta.dataset
        shown = f" (the cache says it was dumped from {recorded.spec!r} with {dict(recorded.kwargs)})" if recorded.spec else ""
        raise KdcacheError(f"--replay needs --dataset SPEC naming the dataset the cache was dumped from{shown}; "
                           "kdcache never runs code named in a cache")
    problems = cache.verify()
    if not cache.complete:  # the summary first, then only what a resumed dump would not mend
        written = int((cache.blocks_record()[:, 0] != 0).sum())
        echo(f"cache {path} is incomplete: {written} of {cache.n_blocks} blocks written; rerun its dump-teacher "
              "command to finish it")
    if problems:
        echo(f"cache {path} is damaged: {len(problems)} missing, corrupt or misplaced chunks; repair it with the "
              "dump-teacher command that wrote it plus --repair (only the damaged blocks are written again)")
    for problem in problems[:20]:
        echo(f"BAD {problem}")
    if len(problems) > 20:
        echo(f"... and {len(problems) - 20} more")
    bad_rows: list[int] = []
    if replay > 0:
        from ..read import replay_mismatches

        data = read_dataset(dataset, dataset_kwargs, text_column, max_length, tokenizer)
        bad_rows, checked = replay_mismatches(data, cache, replay)
        for row in bad_rows[:20]:
            sample, view = divmod(row, cache.views)
            echo(f"BAD replay: view {view} of sample {sample} (row {row}) differs from the input the teacher saw")
        if bad_rows:
            echo(f"{len(bad_rows)} of {checked} replayed rows differ: the dataset changed or its transform is not "
                       "deterministic under a seed (draw randomness from torch, numpy.random or random)")
        else:
            echo(f"replay: {checked} rows regenerated, every input matches its dump-time digest")
    if problems or bad_rows or not cache.complete:
        raise typer.Exit(1)
    echo(f"ok: {path}: every chunk of {len(cache.array_paths())} arrays present and checksums match")


def import_cmd(
    kind: str = typer.Argument(..., help="vllm (JSONL/Parquet of prompt_token_ids + prompt_logprobs) or axolotl "
                                         "(a dataset saved with save_to_disk, or Parquet, with Axolotl's KD columns)."),
    source: Path = typer.Argument(..., help="The file or dataset directory."),
    out: str = typer.Option(..., help="Cache directory to write."),
    vocab_size: int = typer.Option(..., help="The teacher's vocabulary size (every token id is below it)."),
    topk: Optional[int] = typer.Option(None, help="vllm: K ids kept per position [the fewest any position has]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the kdcache cache at --out."),
) -> None:
    """Build a packed top-k cache from an inference engine's or a trainer's teacher logprobs."""
    from ..interop import import_axolotl, import_vllm

    if kind not in ("vllm", "axolotl"):
        raise KdcacheError(f"import reads vllm or axolotl, not {kind!r}")
    if vocab_size < 1 or (topk is not None and topk < 1):
        raise KdcacheError("--vocab-size and --topk must be >= 1")
    log = lambda msg: echo(msg, err=True)  # noqa: E731
    if kind == "vllm":
        cache = import_vllm(source, out, vocab_size=vocab_size, topk=topk, overwrite=overwrite, log=log)
    else:
        cache = import_axolotl(source, out, vocab_size=vocab_size, overwrite=overwrite, log=log)
    echo(cache.path)


def export_cmd(
    path: str = typer.Argument(..., help="A top-k cache."),
    dataset: str = typer.Option(..., help="Spec of the dataset the cache was dumped from (its token rows)."),
    dataset_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for --dataset."),
    out: Path = typer.Option(..., help="Parquet file to write."),
    text_column: Optional[str] = TEXT_COLUMN,
    max_length: Optional[int] = MAX_LENGTH,
    tokenizer: Optional[str] = TOKENIZER,
) -> None:
    """Write input_ids, labels and Axolotl's target_token_ids/target_logprobs/target_mask columns."""
    from ..interop import export_axolotl

    if out.exists() or out.is_symlink():
        raise KdcacheError(f"{out} exists; choose another --out")
    written = export_axolotl(path, read_dataset(dataset, dataset_kwargs, text_column, max_length, tokenizer), out)
    echo(str(written))


# name, short help, function
COMMANDS: list[tuple[str, str, Callable[..., Any]]] = [
    ("info", "Describe a cache.", info_cmd),
    ("ls", "List the caches under a root.", ls_cmd),
    ("verify", "Check every chunk of a cache.", verify_cmd),
    ("import", "Make a top-k cache from vLLM or Axolotl logprobs.", import_cmd),
    ("export", "Write a top-k cache as Parquet with Axolotl's columns.", export_cmd),
]
