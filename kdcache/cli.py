"""The ``kdcache`` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import functools
import json
import tomllib
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from .errors import KdcacheError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Offline knowledge distillation: dump the teacher once, train students from the cache.")


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a KdcacheError as one line and exit 2; Ctrl-C exits 130 without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdcacheError as err:
            typer.echo(f"kdcache: error: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("kdcache: interrupted; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None
    return wrapper


@app.command("dump-teacher")
@_user_errors
def dump_teacher_cmd(
    teacher: Optional[str] = typer.Option(None, help="Teacher spec: pkg.module:attr or path/file.py:attr (callables are called)."),
    dataset: Optional[str] = typer.Option(None, help="Transfer-set spec, same forms; items (inputs, label), {..., 'label'} or inputs."),
    teacher_kwargs: Optional[str] = typer.Option(None, help="JSON object of keyword arguments for the teacher callable."),
    dataset_kwargs: Optional[str] = typer.Option(None, help="JSON object of keyword arguments for the dataset callable."),
    checkpoint: Optional[Path] = typer.Option(None, help="State dict (or kdcache student.pt) to load into the teacher."),
    hidden: Optional[list[str]] = typer.Option(None, help="Submodule whose output to store (repeatable); 'mod#0' takes a tuple's element 0."),
    output_key: Optional[str] = typer.Option(None, help="Pick the logits from a tuple (index), dict (key) or object (attribute)."),
    logits_dtype: Optional[str] = typer.Option(None, help="Stored logits dtype: float16, float32 or bfloat16 [float16]."),
    hidden_dtype: Optional[str] = typer.Option(None, help="Stored hidden-state dtype: float16, float32 or bfloat16 [float16]."),
    topk: Optional[int] = typer.Option(None, help="Store the K largest logits per position + ids + logsumexp (sparse; large vocabularies)."),
    sample_k: Optional[int] = typer.Option(None, help="Store N ids sampled from the teacher per position, as unique ids + counts (unbiased sparse KD)."),
    sample_temperature: Optional[float] = typer.Option(None, help="Temperature of the distribution --sample-k draws from [1.0]."),
    vocab_size: Optional[int] = typer.Option(None, help="Real vocabulary size when the teacher's output layer is padded."),
    mask_key: Optional[str] = typer.Option(None, help="Inputs key of the (B, L) attention mask; padding is stored as zeros and masked [attention_mask]."),
    views: Optional[int] = typer.Option(None, help="Store K augmented views per sample (row = sample*K + view), each made by the dataset's transform under RNGs seeded from (seed, sample, view)."),
    seed: Optional[int] = typer.Option(None, help="Seed of augmentation views and of --sample-k draws [0]."),
    batch_size: Optional[int] = typer.Option(None, help="Teacher batch size [256]."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers preparing batches [0]."),
    device: Optional[str] = typer.Option(None, help="auto (cuda when present), cpu or cuda[:N] [auto]."),
    amp: Optional[str] = typer.Option(None, help="Autocast: auto (bf16 on CUDA, none on CPU), bf16, fp16 or none [auto]."),
    out: Optional[str] = typer.Option(None, help="Cache directory or s3://bucket/prefix URL to write (default: CACHE_ROOT/<fingerprint>)."),
    cache_root: Optional[str] = typer.Option(None, help="Where fingerprint-named caches live (default $KDCACHE_HOME or ./kdcache-store)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace an existing cache at the path (another fingerprint, or redo)."),
    block_rows: Optional[int] = typer.Option(None, help="Rows per write block (default: chosen for ~2 MB chunks)."),
    allow_nonfinite: Optional[bool] = typer.Option(None, "--allow-nonfinite", help="Store NaN/inf teacher outputs instead of stopping at the first."),
    writer_threads: Optional[int] = typer.Option(None, help="Threads writing blocks in parallel [8]."),
    config: Optional[Path] = typer.Option(None, help="TOML file with any of these options as keys (flags override)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show a progress bar [progress]."),
) -> None:
    """Run the teacher once over the dataset and cache its logits and chosen hidden states."""
    from .config import DumpConfig
    from .dump import dump_teacher
    from .spec import load_dataset, load_model

    flags = dict(teacher=teacher, dataset=dataset, teacher_kwargs=teacher_kwargs, dataset_kwargs=dataset_kwargs,
                 checkpoint=checkpoint, hidden=hidden or None, output_key=output_key, logits_dtype=logits_dtype,
                 hidden_dtype=hidden_dtype, topk=topk, sample_k=sample_k, sample_temperature=sample_temperature,
                 vocab_size=vocab_size, mask_key=mask_key, views=views, seed=seed, batch_size=batch_size,
                 num_workers=num_workers, device=device, amp=amp, out=out, cache_root=cache_root, overwrite=overwrite,
                 block_rows=block_rows, allow_nonfinite=allow_nonfinite, writer_threads=writer_threads,
                 progress=progress)
    values = _merge_config(config, flags)
    t_kwargs, d_kwargs = _kwargs_of(values, "teacher_kwargs"), _kwargs_of(values, "dataset_kwargs")
    teacher_spec, dataset_spec = values.pop("teacher", None), values.pop("dataset", None)
    if not teacher_spec or not dataset_spec:
        raise KdcacheError("--teacher and --dataset are required (as flags or in --config)")
    ckpt, out_path = values.pop("checkpoint", None), values.pop("out", None)
    settings = DumpConfig.from_mapping(values)

    model = load_model(teacher_spec, t_kwargs, ckpt)
    data = load_dataset(dataset_spec, d_kwargs)
    cache = dump_teacher(model, data, out_path, config=settings,
                         teacher_info={"spec": teacher_spec, "kwargs": t_kwargs,
                                       "checkpoint": str(ckpt) if ckpt else None},
                         dataset_info={"spec": dataset_spec, "kwargs": d_kwargs})
    typer.echo(cache.path)


def _load_config(path: Optional[Path]) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except OSError as err:
        raise KdcacheError(f"cannot read --config {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise KdcacheError(f"--config {path} is not valid TOML: {err}") from None
    return {k.replace("-", "_"): v for k, v in values.items()}


def _merge_config(config: Optional[Path], flags: dict[str, Any]) -> dict[str, Any]:
    """The ``--config`` file's keys, overridden by the flags given (those not None)."""
    return {**_load_config(config), **{k: v for k, v in flags.items() if v is not None}}


def _kwargs_of(values: dict[str, Any], key: str) -> dict[str, Any]:
    """Pop a ``*_kwargs`` setting: a TOML table, or a JSON object given as a flag."""
    from .spec import parse_kwargs

    raw = values.pop(key, None)
    flag = f"--{key.replace('_', '-')}"
    if raw is None or isinstance(raw, dict):
        return raw or {}
    if not isinstance(raw, str):
        raise KdcacheError(f"{flag} must be a JSON object (or a TOML table), got {raw!r:.60}")
    return parse_kwargs(raw, flag)


@app.command("train-student")
@_user_errors
def train_student_cmd(
    student: Optional[str] = typer.Option(None, help="Student spec: pkg.module:attr or path/file.py:attr."),
    dataset: Optional[str] = typer.Option(None, help="Training (transfer) set spec; rows labelled -1 get only KD terms."),
    cache: Optional[str] = typer.Option(None, help="Teacher cache to distil from; without it, plain training on labels."),
    eval_dataset: Optional[str] = typer.Option(None, help="Labelled dataset spec for per-epoch accuracy and loss."),
    student_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for the student callable."),
    dataset_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for the dataset callable."),
    eval_dataset_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for the eval dataset callable."),
    online_teacher: Optional[str] = typer.Option(None, help="Distil online from this live teacher spec instead (for comparisons)."),
    online_teacher_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for the online teacher."),
    online_teacher_checkpoint: Optional[Path] = typer.Option(None, help="State dict for the online teacher."),
    mask_key: Optional[str] = typer.Option(None, help="Online teacher: inputs key of the (B, L) attention mask [attention_mask]."),
    temperature: Optional[float] = typer.Option(None, help="Softmax temperature T of the KD term [4.0]."),
    alpha: Optional[float] = typer.Option(None, help="Weight of the KD term; CE gets 1 - alpha [0.9]."),
    hint: Optional[list[str]] = typer.Option(None, help="STUDENT_MODULE=TEACHER_MODULE[:mse|cosine|attention][@WEIGHT] (repeatable)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs [10]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [64]."),
    lr: Optional[float] = typer.Option(None, help="Learning rate [1e-3]."),
    optimizer: Optional[str] = typer.Option(None, help="sgd or adamw [adamw]."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay [0]."),
    seed: Optional[int] = typer.Option(None, help="Seed of initialisation and shuffling [0]."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda[:N] [auto]."),
    amp: Optional[str] = typer.Option(None, help="Autocast: auto, bf16, fp16 or none [auto]."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers [0]."),
    in_memory: Optional[str] = typer.Option(None, help="Hold the cache in memory: auto, yes or no [auto]."),
    cache_device: Optional[str] = typer.Option(None, help="Where a cache held in memory lives: auto (the GPU when it fits a quarter of its free memory), cpu or cuda[:N] [auto]."),
    view: Optional[str] = typer.Option(None, help="Cache of K augmentation views: epoch e reads view (e % K) 'cycle' or a seeded 'random' one [cycle]."),
    allow_input_mismatch: Optional[bool] = typer.Option(None, "--allow-input-mismatch", help="Accept inputs that differ from what the teacher saw (deliberate)."),
    out: Optional[Path] = typer.Option(None, help="Directory for metrics.jsonl, student.pt, hints.pt, config.json [student-out]."),
    config: Optional[Path] = typer.Option(None, help="TOML file with any of these options as keys (flags override)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train the student from the cached teacher outputs (the teacher is never loaded)."""
    from .spec import load_dataset, load_model
    from .train import TrainConfig, train_student

    flags = dict(student=student, dataset=dataset, cache=cache, eval_dataset=eval_dataset, student_kwargs=student_kwargs,
                 dataset_kwargs=dataset_kwargs, eval_dataset_kwargs=eval_dataset_kwargs, online_teacher=online_teacher,
                 online_teacher_kwargs=online_teacher_kwargs, online_teacher_checkpoint=online_teacher_checkpoint,
                 mask_key=mask_key, temperature=temperature, alpha=alpha, hints=hint or None, epochs=epochs, batch_size=batch_size, lr=lr,
                 optimizer=optimizer, weight_decay=weight_decay, seed=seed, device=device, amp=amp,
                 num_workers=num_workers, in_memory=in_memory, cache_device=cache_device,
                 allow_input_mismatch=allow_input_mismatch, view=view,
                 out=out)
    values = _merge_config(config, flags)
    if "hint" in values:
        values["hints"] = values.pop("hint")
    s_kwargs, d_kwargs, e_kwargs, t_kwargs = (_kwargs_of(values, k) for k in (
        "student_kwargs", "dataset_kwargs", "eval_dataset_kwargs", "online_teacher_kwargs"))
    student_spec, dataset_spec = values.pop("student", None), values.pop("dataset", None)
    if not student_spec or not dataset_spec:
        raise KdcacheError("--student and --dataset are required (as flags or in --config)")
    cache_path, eval_spec = values.pop("cache", None), values.pop("eval_dataset", None)
    teacher_spec, teacher_ckpt = values.pop("online_teacher", None), values.pop("online_teacher_checkpoint", None)
    out_dir = Path(values.pop("out", "student-out"))
    settings = TrainConfig.from_mapping(values)

    model = load_model(student_spec, s_kwargs, role="student")
    data = load_dataset(dataset_spec, d_kwargs)
    eval_data = load_dataset(eval_spec, e_kwargs) if eval_spec else None
    teacher = load_model(teacher_spec, t_kwargs, teacher_ckpt) if teacher_spec else None
    result = train_student(model, data, cache_path, eval_dataset=eval_data, teacher=teacher, out=out_dir,
                           config=settings, progress=progress,
                           student_spec={"spec": student_spec, "kwargs": s_kwargs})
    final = result.final
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()
             if k in ("epoch", "loss", "eval_acc", "eval_loss", "samples_per_s")}
    typer.echo(json.dumps(shown))
    typer.echo(str(out_dir / "student.pt"))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@app.command("info")
@_user_errors
def info_cmd(path: str = typer.Argument(..., help="A cache directory or URL.")) -> None:
    """Describe a cache: rows, outputs (shape, dtype, bytes), fingerprint, teacher, completeness."""
    from .store import TeacherCache, dump_in_progress

    cache = TeacherCache.open(path)
    meta = cache.meta
    sizes = cache.nbytes_on_disk()
    state = "complete" if cache.complete else ("dump in progress" if dump_in_progress(path) else "INCOMPLETE")
    lines = [f"cache        {path}",
             f"state        {state} ({int(cache.blocks_record()[:, 0].sum())}/{cache.n_blocks} blocks)",
             f"fingerprint  {cache.fingerprint}",
             f"rows         {cache.rows}  (block {cache.block_rows} rows)",
             f"teacher      {meta.teacher.spec or meta.teacher.class_name}  weights {meta.teacher.weights_digest}",
             f"dataset      {meta.dataset.spec or '?'}  length {meta.dataset.length}  digest {meta.dataset.digest}"]
    tokens = meta.tokens or cache.rows
    for name, o in cache.outputs.items():
        codec = o.codec.params()
        what = codec["dtype"] if codec["name"] == "dense" else " ".join(f"{k}={v}" for k, v in codec.items())
        lines.append(f"  {name}: shape ({cache.rows}, {', '.join(map(str, o.shape))})  {what}")
        for a in o.arrays.values():
            per = f"{sizes[a.path] / tokens:.1f} B/token" if meta.mask_key or tokens != cache.rows \
                else f"{sizes[a.path] / cache.rows:.0f} B/row"
            lines.append(f"    {a.path:<24} ({cache.rows}, {', '.join(map(str, a.shape))}) {a.dtype}  chunk "
                         f"{a.chunk_rows} rows  {_size(sizes[a.path])} on disk ({per})")
    if meta.vocab.real != meta.vocab.padded or meta.mask_key:
        lines.append(f"vocabulary   {meta.vocab.real} classes (output layer {meta.vocab.padded})"
                     + (f"; padding masked by inputs[{meta.mask_key!r}], {tokens} real tokens" if meta.mask_key else ""))
    if cache.seed is not None:
        lines.append(f"views        {cache.views} per sample (row = sample * {cache.views} + view), seed {cache.seed}"
                     + (f", explicit parameters {list(meta.view_params_shape)}" if meta.view_params_shape else ""))
    acc = meta.teacher_accuracy
    if acc is not None and acc.labelled:
        lines.append(f"teacher accuracy on the transfer set's labels: {acc.accuracy:.4f} ({acc.correct}/{acc.labelled})")
    if meta.dump is not None and meta.dump.rows_per_s is not None:
        lines.append(f"dump         {meta.dump.rows_per_s:.0f} rows/s, {meta.dump.mb_per_s} MB/s on {meta.dump.device}")
    lines.append("versions     " + " ".join(f"{k} {v}" for k, v in meta.versions.items()))
    typer.echo("\n".join(lines))


@app.command("ls")
@_user_errors
def ls_cmd(root: Optional[str] = typer.Argument(None, help="Cache root, a directory or URL "
                                                             "[$KDCACHE_HOME or ./kdcache-store].")) -> None:
    """List the caches under a root, one line each."""
    from .dump import default_cache_root
    from .store import TeacherCache, list_dir

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
            typer.echo(f"{entry}  unreadable: {err}")
            continue
        found += 1
        outputs = ",".join(a.path for o in cache.outputs.values() for a in o.arrays.values())
        teacher = cache.meta.teacher
        size = sum(cache.nbytes_on_disk().values())
        typer.echo(f"{entry}  {'complete' if cache.complete else 'incomplete'}  {cache.rows} rows  {outputs}  "
                   f"{_size(size)}  teacher {teacher.spec or teacher.class_name}")
    if not found:
        typer.echo(f"no caches under {root}", err=True)


@app.command("verify")
@_user_errors
def verify_cmd(
    path: str = typer.Argument(..., help="A cache directory or URL."),
    replay: int = typer.Option(0, help="Also regenerate N random rows' inputs (views replayed from their seeds, no "
                                      "teacher) and check they hash to what the dump recorded."),
    dataset: Optional[str] = typer.Option(None, help="Dataset spec for --replay [the one recorded in the cache]."),
    dataset_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for --dataset [recorded]."),
) -> None:
    """Read every chunk and report each missing or corrupt one with its row range (exit 1 if any)."""
    from .store import TeacherCache

    cache = TeacherCache.open(path)
    problems = cache.verify()
    for problem in problems:
        typer.echo(f"BAD {problem}")
    if not cache.complete:
        typer.echo(f"cache {path} is incomplete: rerun its dump-teacher command to finish it")
    bad_rows: list[int] = []
    if replay > 0:
        from .dataset import replay_mismatches
        from .spec import load_dataset, parse_kwargs

        recorded = cache.meta.dataset
        spec = dataset or recorded.spec
        if not spec:
            raise KdcacheError("--replay needs the dataset: this cache records no dataset spec, pass --dataset")
        kwargs = parse_kwargs(dataset_kwargs, "--dataset-kwargs") if dataset_kwargs else dict(recorded.kwargs)
        bad_rows, checked = replay_mismatches(load_dataset(spec, kwargs), cache, replay)
        for row in bad_rows[:20]:
            sample, view = divmod(row, cache.views)
            typer.echo(f"BAD replay: view {view} of sample {sample} (row {row}) differs from the input the teacher saw")
        if bad_rows:
            typer.echo(f"{len(bad_rows)} of {checked} replayed rows differ: the dataset changed or its transform is not "
                       "deterministic under a seed (draw randomness from torch, numpy.random or random)")
        else:
            typer.echo(f"replay: {checked} rows regenerated, every input matches its dump-time digest")
    if problems or bad_rows or not cache.complete:
        raise typer.Exit(1)
    typer.echo(f"ok: {path}: every chunk of {len(cache.array_paths())} arrays present and checksums match")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
