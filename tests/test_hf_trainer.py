"""KDTrainer: a transformers.Trainer that reads its teacher targets from the cache."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import hf_helpers  # noqa: E402

import kdcache  # noqa: E402
from kdcache import KdcacheError  # noqa: E402
from kdcache.data.hf import pad_rows, prepare  # noqa: E402
from kdcache.integrations.hf import TEACHER_KEY, KDTrainer  # noqa: E402
from kdcache.losses import KLDivLoss, TopKKLDivLoss  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

LENGTH = 10


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, report_to=[], use_cpu=True,
                save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def _texts_with_a_text_column(tok, n=24):
    """Tokenized, padded rows that keep their string column (not a model input)."""
    ds = hf_helpers.text_dataset(n).map(lambda b: tok(b["text"], truncation=True, max_length=LENGTH), batched=True)
    return pad_rows(ds, LENGTH, tok.pad_token_id)


@pytest.mark.parametrize("form", ["dense", "topk"])
def test_one_step_loss_equals_kdcache_losses_and_targets_survive_remove_unused_columns(tmp_path, form):
    tok = hf_helpers.tokenizer()
    real = len(tok)
    ds = _texts_with_a_text_column(tok)
    # the top-k teacher's output layer is padded past the tokenizer's vocabulary
    teacher = hf_helpers.gpt2(real + 5 if form == "topk" else real, seed=0)
    extra = {"topk": 4} if form == "topk" else {"logits_dtype": "float32"}
    cache = kdcache.dump_teacher(teacher, ds, tmp_path / "c", tokenizer=tok, vocab_size=real, batch_size=8,
                                 progress=False, **extra)
    student = hf_helpers.gpt2(real, seed=1)
    trainer = KDTrainer(model=student, args=_args(tmp_path, remove_unused_columns=True), train_dataset=ds,
                        processing_class=tok, kd_cache=cache.path, temperature=2.0, alpha=1.0)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "text" not in batch and TEACHER_KEY in batch  # the string column dropped, the cached targets kept
    targets = batch[TEACHER_KEY]
    # the attached targets are those of the batch's rows (found by their input ids)
    ids = prepare(ds)[:]["input_ids"]
    rows = [int(torch.nonzero((ids == r).all(1))[0]) for r in batch["input_ids"]]
    assert sorted(set(rows)) == sorted(rows)
    _, _, by_index = kdcache.collate(kdcache.CachedTeacherDataset(ds, cache, dtype=None).__getitems__(rows))
    mask = batch["attention_mask"].bool()
    assert torch.equal(targets.mask, mask)

    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if form == "dense":
        assert torch.equal(targets.logits, by_index.logits)
        expected = KLDivLoss(2.0)(logits, by_index.logits.float()[..., :real], mask)
    else:
        assert all(torch.equal(targets.logits[k], by_index.logits[k]) for k in by_index.logits.keys())
        expected = TopKKLDivLoss(2.0)(logits, **{k: by_index.logits[k] for k in by_index.logits.keys()}, mask=mask)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)

    if form == "dense":  # the same loss online, from the live teacher
        online = KDTrainer(model=student, args=_args(tmp_path), train_dataset=ds, teacher=teacher, temperature=2.0,
                           alpha=1.0)
        live = dict(batch)
        live.pop(TEACHER_KEY)
        student.train()  # online targets are computed on training steps (dropout is 0 here)
        assert float(online.compute_loss(student, live).detach()) == pytest.approx(float(expected), rel=1e-4)

    trainer.args.max_steps = 3
    result = trainer.train()
    assert trainer.state.global_step == 3 and np.isfinite(result.training_loss)


def _fixed_length_rows(n=16, vocab=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, LENGTH), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * LENGTH] * n,
                                       "labels": ids.tolist()})


def _one_step(tmp_path, cache, ds, name, **kw):
    student = hf_helpers.gpt2(29, seed=1)
    args = _args(tmp_path / name, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_steps=1, **kw)
    KDTrainer(model=student, args=args, train_dataset=ds, kd_cache=cache.path, temperature=2.0, alpha=0.5).train()
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def test_gradient_accumulation_gives_the_step_of_one_large_batch(tmp_path):
    ds = _fixed_length_rows()
    cache = kdcache.dump_teacher(hf_helpers.gpt2(29, seed=0), ds, tmp_path / "c", batch_size=8, progress=False)
    whole = _one_step(tmp_path, cache, ds, "whole", per_device_train_batch_size=8)
    halves = _one_step(tmp_path, cache, ds, "halves", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    start = hf_helpers.gpt2(29, seed=1).state_dict()
    assert any(not torch.equal(whole[k], start[k]) for k in whole)
    for k in whole:
        torch.testing.assert_close(halves[k], whole[k], rtol=1e-4, atol=1e-6)
    bf16 = _one_step(tmp_path, cache, ds, "bf16", per_device_train_batch_size=8, bf16=True)
    assert all(torch.isfinite(v).all() for v in bf16.values())


def test_a_tokenizer_with_another_vocabulary_is_refused_unless_allowed(tmp_path):
    tok = hf_helpers.tokenizer()
    ds = prepare(hf_helpers.text_dataset(16), tok, text_column="text", max_length=LENGTH)
    cache = kdcache.dump_teacher(hf_helpers.gpt2(len(tok)), ds, tmp_path / "c", tokenizer=tok, progress=False)
    other = hf_helpers.tokenizer(shuffle=2)
    student = hf_helpers.gpt2(len(tok), seed=1)
    with pytest.raises(KdcacheError, match="is not the teacher's.*allow_vocab_mismatch=True") as err:
        KDTrainer(model=student, args=_args(tmp_path), train_dataset=ds, processing_class=other, kd_cache=cache.path)
    assert "\n" not in str(err.value)
    KDTrainer(model=student, args=_args(tmp_path), train_dataset=ds, processing_class=other, kd_cache=cache.path,
              allow_vocab_mismatch=True)


TORCHRUN_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    sys.path.insert(0, sys.argv[3])
    import datasets, hf_helpers
    from transformers import TrainingArguments
    from kdcache.integrations.hf import KDTrainer, KDCollator
    seen = []
    call = KDCollator.__call__
    def recording(self, features):
        seen.extend(int(f["kd_row"]) for f in features)
        return call(self, features)
    KDCollator.__call__ = recording
    ds = datasets.load_from_disk(sys.argv[1])
    student = hf_helpers.gpt2(29, seed=1)
    args = TrainingArguments(output_dir=sys.argv[2], per_device_train_batch_size=4, max_steps=2, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, learning_rate=1e-2)
    trainer = KDTrainer(model=student, args=args, train_dataset=ds, kd_cache=sys.argv[2] + "/cache", alpha=0.5)
    trainer.train()
    rank = trainer.args.process_index
    digest = float(sum(p.double().sum() for p in student.parameters()))
    json.dump({"rows": seen, "world": trainer.args.world_size, "steps": trainer.state.global_step,
               "params": digest}, open(f"{sys.argv[2]}/rank{rank}.json", "w"))
    # leave the process group together: a gloo group alive at exit can abort a rank
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
''')


@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: 2 ranks each on 2 cores
def test_two_process_torchrun_trains_disjoint_rows_to_the_same_model(tmp_path):
    ds = _fixed_length_rows(n=16)
    ds.save_to_disk(str(tmp_path / "data"))
    kdcache.dump_teacher(hf_helpers.gpt2(29, seed=0), ds, tmp_path / "cache", progress=False)
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    here = str(__import__("pathlib").Path(hf_helpers.__file__).parent)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(tmp_path / "data"), str(tmp_path), here],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["steps"] == 2 for r in ranks)
    assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"]) and len(ranks[0]["rows"]) == 8
    assert ranks[0]["params"] == ranks[1]["params"]  # gradients averaged: one model


def test_trl_sft_trainer_takes_the_same_mixin(tmp_path):
    trl = pytest.importorskip("trl")
    from kdcache.integrations.hf import KDTrainerMixin

    class KDSFTTrainer(KDTrainerMixin, trl.SFTTrainer):
        pass

    tok = hf_helpers.tokenizer()
    ds = prepare(hf_helpers.text_dataset(16), tok, text_column="text", max_length=LENGTH)
    cache = kdcache.dump_teacher(hf_helpers.gpt2(len(tok)), ds, tmp_path / "c", tokenizer=tok, progress=False)
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, use_cpu=True,
                         report_to=[], save_strategy="no", disable_tqdm=True,
                         dataset_kwargs={"skip_prepare_dataset": True})
    trainer = KDSFTTrainer(model=hf_helpers.gpt2(len(tok), seed=1), args=args, train_dataset=ds.with_format(None),
                           processing_class=tok, kd_cache=cache.path, alpha=1.0)
    batch = next(iter(trainer.get_train_dataloader()))
    assert TEACHER_KEY in batch and batch[TEACHER_KEY].logits.shape == (4, LENGTH, len(tok))
    assert np.isfinite(trainer.train().training_loss) and trainer.state.global_step == 2


@pytest.mark.parametrize("objective", ["kl", "jsd:0.1"])
def test_head_cache_of_a_gpt2_teacher_gives_the_dense_cache_loss_through_kd_trainer(tmp_path, objective):
    ds = _fixed_length_rows()
    teacher = hf_helpers.gpt2(29, seed=0)
    dense = kdcache.dump_teacher(teacher, ds, tmp_path / "dense", batch_size=8, progress=False)
    head = kdcache.dump_teacher(teacher, ds, tmp_path / "head", head="lm_head", batch_size=8, progress=False)
    assert not head.meta.logits.codec.bias and head.meta.logits.arrays["hidden"].row_bytes == 2 * 16
    losses = []
    for cache in (dense, head):
        student = hf_helpers.gpt2(29, seed=1)
        trainer = KDTrainer(model=student, args=_args(tmp_path / cache.path[-4:]), train_dataset=ds,
                            kd_cache=cache.path, temperature=2.0, alpha=1.0, objective=objective)
        batch = next(iter(trainer.get_train_dataloader()))
        losses.append(float(trainer.compute_loss(student, dict(batch)).detach()))
    assert losses[1] == pytest.approx(losses[0], rel=5e-3)
    trainer.args.max_steps = 2
    assert np.isfinite(trainer.train().training_loss)
