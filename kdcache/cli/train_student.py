"""``kdcache train-student``: load the student and the data from their specs, train from the cache
(or plainly, or online for comparisons), print the last epoch's figures and the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config.train import TrainConfig
from ..errors import KdcacheError
from .options import HFOptions, Option, command, config_option, hf_options, kwargs_of, merge_config, text
from .output import echo, warnings_as_lines

__all__ = ["train_student_cmd", "OPTIONS"]

# the options in the order --help shows them; a string is a TrainConfig setting, declared there
OPTIONS: list[Option | str] = [
    Option("student", str, "Student spec: pkg.module:attr or path/file.py:attr.", metavar="SPEC"),
    Option("dataset", str, "Training (transfer) set spec; rows labelled -1 get only KD terms.", metavar="SPEC"),
    Option("cache", str, "Teacher cache to distil from; without it, plain training on labels.", metavar="PATH"),
    Option("eval_dataset", str, "Labelled dataset spec for per-epoch accuracy and loss.", metavar="SPEC"),
    Option("eval_cache", str, "The teacher's cache of --eval-dataset: record the student's KL to the teacher on "
                              "held-out rows each epoch and warn when it overfits the cache.", metavar="PATH"),
    Option("student_kwargs", str, "JSON keyword arguments for the student callable.", metavar="JSON"),
    Option("dataset_kwargs", str, "JSON keyword arguments for the dataset callable.", metavar="JSON"),
    Option("eval_dataset_kwargs", str, "JSON keyword arguments for the eval dataset callable.", metavar="JSON"),
    Option("online_teacher", str, "Distil online from this live teacher spec instead (for comparisons).",
           metavar="SPEC"),
    Option("online_teacher_kwargs", str, "JSON keyword arguments for the online teacher.", metavar="JSON"),
    Option("online_teacher_checkpoint", Path, "State dict for the online teacher.", metavar="FILE"),
    "mask_key", "temperature", "alpha", "objective", "hints", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "seed",
    "device", "amp", "num_workers", "in_memory", "cache_device", "view", "allow_input_mismatch",
    Option("out", Path, "Directory for metrics.jsonl, student.pt, hints.pt, config.json, resume.pt; an existing run "
                        "there is refused without --resume or --overwrite.", shown="student-out", metavar="PATH"),
    "resume", "overwrite", "output_key",
    *hf_options("student", "", "", " (as at dump time)", " (as at dump time)"),
    Option("tokenizer", str, "Tokenizer directory for --text-column.", shown="the hf: student's", metavar="TOKENIZER"),
    Option("allow_vocab_mismatch", bool, "Accept a student tokenizer whose vocabulary differs from the teacher's.",
           switch="--allow-vocab-mismatch"),
    config_option(),
    Option("progress", bool, "Show a progress bar.", default=True),
]


def _train_student(flags: dict[str, Any]) -> None:
    from ..spec import load_model
    from ..train import train_student
    from ..train.rundir import RunDir

    progress = flags.pop("progress")
    values = merge_config(flags)
    if "hint" in values:
        values["hints"] = values.pop("hint")
    s_kwargs, d_kwargs, e_kwargs, t_kwargs = (kwargs_of(values, k) for k in (
        "student_kwargs", "dataset_kwargs", "eval_dataset_kwargs", "online_teacher_kwargs"))
    student_spec, dataset_spec = text(values, "student"), text(values, "dataset")
    if not student_spec or not dataset_spec:
        raise KdcacheError("--student and --dataset are required (as flags or in --config)")
    cache_path, eval_spec, eval_cache_path = text(values, "cache"), text(values, "eval_dataset"), text(values, "eval_cache")
    teacher_spec, teacher_ckpt = text(values, "online_teacher"), text(values, "online_teacher_checkpoint")
    out_dir = Path(text(values, "out") or "student-out")
    hf = HFOptions.pop_from(values)
    allow_vocab = values.pop("allow_vocab_mismatch", False)
    if not isinstance(allow_vocab, bool):
        raise KdcacheError(f"--allow-vocab-mismatch must be true or false, got {allow_vocab!r:.40}")
    settings = TrainConfig.from_mapping(values)
    run = RunDir(out_dir)
    identity = {"cache": cache_path, "student": {"spec": student_spec, "kwargs": s_kwargs}}
    if run.check(settings, identity) and settings.resume:  # before anything is loaded: a refused run costs nothing
        echo(f"kdcache: resuming the run in {out_dir} from its last finished epoch", err=True)

    student_tokenizer = hf.tokenizer_for(student_spec, "student")
    if cache_path is not None:
        from ..models.hf import check_tokenizer
        from ..store import TeacherCache

        check_tokenizer(TeacherCache.open(cache_path).meta.teacher.tokenizer, student_tokenizer, allow=allow_vocab)
    data = hf.dataset(dataset_spec, d_kwargs, student_tokenizer)
    eval_data = hf.dataset(eval_spec, e_kwargs, student_tokenizer) if eval_spec else None
    teacher = load_model(teacher_spec, t_kwargs, teacher_ckpt) if teacher_spec else None
    # built by train_student right after seeding: --seed fixes the initial weights too
    with warnings_as_lines():
        result = train_student(lambda: hf.model(student_spec, s_kwargs, None, "student"), data, cache_path,
                               eval_dataset=eval_data, eval_cache=eval_cache_path, teacher=teacher, out=out_dir,
                               config=settings, progress=progress, student_spec=identity["student"])
    final = result.final
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()
             if k in ("epoch", "loss", "eval_acc", "eval_loss", "samples_per_s")}
    echo(json.dumps(shown))
    echo(str(out_dir / "student.pt"))


train_student_cmd = command(TrainConfig, OPTIONS, _train_student,
                            "Train the student from the cached teacher outputs (the teacher is never loaded).")
