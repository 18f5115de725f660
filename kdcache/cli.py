"""The ``kdcache`` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Optional

import typer

from . import cli_cache, cli_figures
from .cli_errors import echo, run_app, user_errors, warnings_as_lines
from .cli_help import HelpCommand
from .errors import KdcacheError, speak_cli

__all__ = ["app", "main"]

# Plain click help (rich_markup_mode=None): rich's markup would eat bracketed text such as
# "cuda[:N]" or "[@WEIGHT]", and its tables cut long option names at 80 columns. Nothing here
# imports torch at module level: `kdcache --help` stays fast.
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"max_content_width": 100},
                  help="Offline knowledge distillation: dump the teacher once, train students from the cache.")


@app.command("dump-teacher", short_help="Run the teacher once; cache its outputs.", cls=HelpCommand)
@user_errors
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
    sample_temperature: Optional[float] = typer.Option(None, help="Temperature of the distribution --sample-k/--tail-samples draw from [1.0]."),
    tail_samples: Optional[int] = typer.Option(None, help="With --topk K: also store N draws from the other classes (hybrid: exact head, unbiased tail)."),
    sample_draws: Optional[str] = typer.Option(None, help="How --sample-k/--tail-samples draw: iid or systematic (evenly spaced quantiles; lower variance) [iid]."),
    vocab_size: Optional[int] = typer.Option(None, help="Real vocabulary size when the teacher's output layer is padded."),
    mask_key: Optional[str] = typer.Option(None, help="Inputs key of the (B, L) attention mask; padding is stored as zeros and masked [attention_mask]."),
    views: Optional[int] = typer.Option(None, help="Store K augmented views per sample (row = sample*K + view), each made by the dataset's transform under RNGs seeded from (seed, sample, view)."),
    seed: Optional[int] = typer.Option(None, help="Seed of augmentation views and of --sample-k/--tail-samples draws [0]."),
    batch_size: Optional[int] = typer.Option(None, help="Teacher batch size [256]."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers preparing batches [0]."),
    device: Optional[str] = typer.Option(None, help="auto (cuda when present), cpu or cuda[:N] [auto]."),
    amp: Optional[str] = typer.Option(None, help="Autocast: auto (bf16 on CUDA, none on CPU), bf16, fp16 or none [auto]."),
    out: Optional[str] = typer.Option(None, help="Cache directory or s3://bucket/prefix URL to write (default: CACHE_ROOT/<fingerprint>)."),
    cache_root: Optional[str] = typer.Option(None, help="Where fingerprint-named caches live (default $KDCACHE_HOME or ./kdcache-store)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace the kdcache cache at the path (another fingerprint, or redo); never anything else."),
    repair: Optional[bool] = typer.Option(None, "--repair", help="Write again only the blocks kdcache verify finds damaged (same teacher, data and settings)."),
    block_rows: Optional[int] = typer.Option(None, help="Rows per write block (default: chosen for ~2 MB chunks)."),
    allow_nonfinite: Optional[bool] = typer.Option(None, "--allow-nonfinite", help="Store NaN/inf teacher outputs instead of stopping at the first."),
    writer_threads: Optional[int] = typer.Option(None, help="Threads writing blocks in parallel [8]."),
    hf_class: Optional[str] = typer.Option(None, help="hf:PATH teacher: transformers class to load it with, e.g. AutoModelForCausalLM [the config's]."),
    hf_dtype: Optional[str] = typer.Option(None, help="hf:PATH teacher: float32, float16, bfloat16 or auto (as stored) [float32]."),
    text_column: Optional[str] = typer.Option(None, help="Hugging Face dataset: tokenize this text column with the teacher's tokenizer."),
    max_length: Optional[int] = typer.Option(None, help="Hugging Face dataset: truncate and pad token rows to this length."),
    config: Optional[Path] = typer.Option(None, help="TOML file with any of these options as keys (flags override)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Show a progress bar [progress]."),
) -> None:
    """Run the teacher once over the dataset and cache its logits and chosen hidden states."""
    from .config import DumpConfig
    from .dump import dump_teacher

    flags = dict(teacher=teacher, dataset=dataset, teacher_kwargs=teacher_kwargs, dataset_kwargs=dataset_kwargs,
                 checkpoint=checkpoint, hidden=hidden or None, output_key=output_key, logits_dtype=logits_dtype,
                 hidden_dtype=hidden_dtype, topk=topk, sample_k=sample_k, sample_temperature=sample_temperature,
                 tail_samples=tail_samples, sample_draws=sample_draws,
                 vocab_size=vocab_size, mask_key=mask_key, views=views, seed=seed, batch_size=batch_size,
                 num_workers=num_workers, device=device, amp=amp, out=out, cache_root=cache_root, overwrite=overwrite, repair=repair,
                 block_rows=block_rows, allow_nonfinite=allow_nonfinite, writer_threads=writer_threads,
                 progress=progress, hf_class=hf_class, hf_dtype=hf_dtype, text_column=text_column,
                 max_length=max_length)
    values = _merge_config(config, flags)
    t_kwargs, d_kwargs = _kwargs_of(values, "teacher_kwargs"), _kwargs_of(values, "dataset_kwargs")
    teacher_spec, dataset_spec = _text(values, "teacher"), _text(values, "dataset")
    if not teacher_spec or not dataset_spec:
        raise KdcacheError("--teacher and --dataset are required (as flags or in --config)")
    ckpt, out_path = _text(values, "checkpoint"), _text(values, "out")
    hf = _HFOptions.pop_from(values)
    settings = DumpConfig.from_mapping(values)

    tokenizer = hf.tokenizer_for(teacher_spec, "teacher")
    model = hf.model(teacher_spec, t_kwargs, ckpt, "teacher")
    data = hf.dataset(dataset_spec, d_kwargs, tokenizer)
    cache = dump_teacher(model, data, out_path, config=settings, tokenizer=tokenizer,
                         teacher_info={"spec": teacher_spec, "kwargs": t_kwargs,
                                       "checkpoint": str(ckpt) if ckpt else None},
                         dataset_info={"spec": dataset_spec, "kwargs": d_kwargs})
    echo(cache.path)


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


def _text(values: dict[str, Any], key: str) -> str | None:
    """Pop a spec or path setting: a string (a flag's path too), or None when not given."""
    raw = values.pop(key, None)
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, Path):
        return str(raw)
    raise KdcacheError(f"--{key.replace('_', '-')} must be a string, got {raw!r:.60}")


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


class _HFOptions:
    """The Hugging Face loading options of a command (``--hf-class``, ``--hf-dtype``,
    ``--text-column``, ``--max-length``, ``--tokenizer``): how specs become models and datasets."""

    KEYS = ("hf_class", "hf_dtype", "text_column", "max_length", "tokenizer")  # popped before the settings

    def __init__(self, values: dict[str, Any]) -> None:
        self.hf_class, self.hf_dtype = values.get("hf_class"), values.get("hf_dtype")
        self.text_column, self.max_length = values.get("text_column"), values.get("max_length")
        self.tokenizer = values.get("tokenizer")

    @classmethod
    def pop_from(cls, values: dict[str, Any]) -> "_HFOptions":
        return cls({k: values.pop(k) for k in cls.KEYS if k in values})

    def tokenizer_for(self, spec: str, role: str) -> Any:
        """The tokenizer in ``--tokenizer`` or beside an hf: model (None when there is none).
        Every Hugging Face load of the command happens offline, after this."""
        from .hfmodels import is_hf_spec, load_tokenizer, offline

        offline()
        source = self.tokenizer or (spec if is_hf_spec(spec) else None)
        return load_tokenizer(source, role=role, required=self.tokenizer is not None) if source else None

    def model(self, spec: str, kwargs: dict[str, Any], checkpoint: Any, role: str) -> Any:
        from .spec import load_model

        return load_model(spec, kwargs, checkpoint, role=role, hf_class=self.hf_class, hf_dtype=self.hf_dtype)

    def dataset(self, spec: str, kwargs: dict[str, Any], tokenizer: Any) -> Any:
        from .spec import load_dataset

        return load_dataset(spec, kwargs, tokenizer=tokenizer, text_column=self.text_column, max_length=self.max_length)


@app.command("train-student", short_help="Train a student from a cache.", cls=HelpCommand)
@user_errors
def train_student_cmd(
    student: Optional[str] = typer.Option(None, help="Student spec: pkg.module:attr or path/file.py:attr."),
    dataset: Optional[str] = typer.Option(None, help="Training (transfer) set spec; rows labelled -1 get only KD terms."),
    cache: Optional[str] = typer.Option(None, help="Teacher cache to distil from; without it, plain training on labels."),
    eval_dataset: Optional[str] = typer.Option(None, help="Labelled dataset spec for per-epoch accuracy and loss."),
    eval_cache: Optional[str] = typer.Option(None, help="The teacher's cache of --eval-dataset: record the student's KL to the teacher on held-out rows each epoch and warn when it overfits the cache."),
    student_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for the student callable."),
    dataset_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for the dataset callable."),
    eval_dataset_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for the eval dataset callable."),
    online_teacher: Optional[str] = typer.Option(None, help="Distil online from this live teacher spec instead (for comparisons)."),
    online_teacher_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for the online teacher."),
    online_teacher_checkpoint: Optional[Path] = typer.Option(None, help="State dict for the online teacher."),
    mask_key: Optional[str] = typer.Option(None, help="Online teacher: inputs key of the (B, L) attention mask [attention_mask]."),
    temperature: Optional[float] = typer.Option(None, help="Softmax temperature T of the KD term [4.0]."),
    alpha: Optional[float] = typer.Option(None, help="Weight of the KD term; CE gets 1 - alpha [0.9]."),
    hint: Optional[list[str]] = typer.Option(None, help="Hint term (repeatable): student module S, teacher module T, LOSS mse, cosine or attention [mse], WEIGHT [1.0]."),
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
    hf_class: Optional[str] = typer.Option(None, help="hf:PATH student: transformers class to load it with [the config's]."),
    hf_dtype: Optional[str] = typer.Option(None, help="hf:PATH student: float32, float16, bfloat16 or auto [float32]."),
    text_column: Optional[str] = typer.Option(None, help="Hugging Face dataset: tokenize this text column (as at dump time)."),
    max_length: Optional[int] = typer.Option(None, help="Hugging Face dataset: truncate and pad token rows to this length (as at dump time)."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer directory for --text-column [the hf: student's]."),
    allow_vocab_mismatch: Optional[bool] = typer.Option(None, "--allow-vocab-mismatch", help="Accept a student tokenizer whose vocabulary differs from the teacher's."),
    config: Optional[Path] = typer.Option(None, help="TOML file with any of these options as keys (flags override)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train the student from the cached teacher outputs (the teacher is never loaded)."""
    from .spec import load_model
    from .train import TrainConfig, train_student

    flags = dict(student=student, dataset=dataset, cache=cache, eval_dataset=eval_dataset, eval_cache=eval_cache,
                 student_kwargs=student_kwargs,
                 dataset_kwargs=dataset_kwargs, eval_dataset_kwargs=eval_dataset_kwargs, online_teacher=online_teacher,
                 online_teacher_kwargs=online_teacher_kwargs, online_teacher_checkpoint=online_teacher_checkpoint,
                 mask_key=mask_key, temperature=temperature, alpha=alpha, hints=hint or None, epochs=epochs, batch_size=batch_size, lr=lr,
                 optimizer=optimizer, weight_decay=weight_decay, seed=seed, device=device, amp=amp,
                 num_workers=num_workers, in_memory=in_memory, cache_device=cache_device,
                 allow_input_mismatch=allow_input_mismatch, view=view,
                 out=out, hf_class=hf_class, hf_dtype=hf_dtype, text_column=text_column, max_length=max_length,
                 tokenizer=tokenizer, allow_vocab_mismatch=allow_vocab_mismatch)
    values = _merge_config(config, flags)
    if "hint" in values:
        values["hints"] = values.pop("hint")
    s_kwargs, d_kwargs, e_kwargs, t_kwargs = (_kwargs_of(values, k) for k in (
        "student_kwargs", "dataset_kwargs", "eval_dataset_kwargs", "online_teacher_kwargs"))
    student_spec, dataset_spec = _text(values, "student"), _text(values, "dataset")
    if not student_spec or not dataset_spec:
        raise KdcacheError("--student and --dataset are required (as flags or in --config)")
    cache_path, eval_spec, eval_cache_path = _text(values, "cache"), _text(values, "eval_dataset"), _text(values, "eval_cache")
    teacher_spec, teacher_ckpt = _text(values, "online_teacher"), _text(values, "online_teacher_checkpoint")
    out_dir = Path(_text(values, "out") or "student-out")
    hf = _HFOptions.pop_from(values)
    allow_vocab = values.pop("allow_vocab_mismatch", False)
    if not isinstance(allow_vocab, bool):
        raise KdcacheError(f"--allow-vocab-mismatch must be true or false, got {allow_vocab!r:.40}")
    settings = TrainConfig.from_mapping(values)

    student_tokenizer = hf.tokenizer_for(student_spec, "student")
    if cache_path is not None:
        from .hfmodels import check_tokenizer
        from .store import TeacherCache

        check_tokenizer(TeacherCache.open(cache_path).meta.teacher.tokenizer, student_tokenizer, allow=allow_vocab)
    data = hf.dataset(dataset_spec, d_kwargs, student_tokenizer)
    eval_data = hf.dataset(eval_spec, e_kwargs, student_tokenizer) if eval_spec else None
    teacher = load_model(teacher_spec, t_kwargs, teacher_ckpt) if teacher_spec else None
    # built by train_student right after seeding: --seed fixes the initial weights too
    with warnings_as_lines():
        result = train_student(lambda: hf.model(student_spec, s_kwargs, None, "student"), data, cache_path,
                               eval_dataset=eval_data, eval_cache=eval_cache_path, teacher=teacher, out=out_dir,
                               config=settings, progress=progress, student_spec={"spec": student_spec, "kwargs": s_kwargs})
    final = result.final
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()
             if k in ("epoch", "loss", "eval_acc", "eval_loss", "samples_per_s")}
    echo(json.dumps(shown))
    echo(str(out_dir / "student.pt"))


for name, short, command in cli_cache.COMMANDS:
    app.command(name, short_help=short, cls=HelpCommand)(user_errors(command))
app.command("report", short_help="Draw what a cache holds (PNGs + HTML).", cls=HelpCommand)(
    user_errors(cli_figures.report_cmd))
app.command("plot", short_help="Draw training runs side by side.", cls=HelpCommand)(user_errors(cli_figures.plot_cmd))


def main(argv: Optional[list[str]] = None) -> None:
    """The ``kdcache`` command. A usage mistake (unknown option, missing or bad value) is one
    line on stderr naming the closest option, exit status 2."""
    speak_cli()  # error messages name flags (--overwrite), not arguments (overwrite=True)
    if int(os.environ.get("WORLD_SIZE") or 1) > 1 and int(os.environ.get("RANK") or 0) > 0:
        sys.stdout = open(os.devnull, "w")  # under torchrun the results print once, from rank 0
    code = 1
    try:
        code = run_app(app, argv)
    finally:
        if "torch.distributed" in sys.modules:  # only a command that used it imported it
            from .distributed import shutdown
            shutdown(clean=code == 0)
    sys.exit(code)


if __name__ == "__main__":
    main()
