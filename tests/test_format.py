"""The typed cache description: CacheMeta round trips, malformed attrs, DumpConfig, stable fingerprints."""

from __future__ import annotations

import copy
import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

import kdcache
from kdcache import CachedTeacherDataset, DumpConfig, KdcacheError, TeacherCache
from kdcache.examples import digits
from kdcache.format import CacheMeta
from kdcache.store import fingerprint

from conftest import REPO, run_cli

FIXTURES = Path(__file__).parent / "fixtures"


def _recorded(path: Path) -> dict:
    """The group attribute ``kdcache`` exactly as it is on disk."""
    return json.loads((Path(path) / "zarr.json").read_text())["attributes"]["kdcache"]


@pytest.fixture(params=["dense+hidden", "bfloat16", "topk", "sampled", "hybrid", "views", "explicit-views"])
def dumped(request, tmp_path, models):
    """A cache of each kind the format knows: codecs, sequences with masks, views."""
    kind = request.param
    quiet = dict(progress=False, log=lambda m: None)
    if kind in ("topk", "sampled", "hybrid"):
        sparse = {"topk": {"topk": 8}, "sampled": {"sample_k": 16, "seed": 3},
                  "hybrid": {"topk": 4, "tail_samples": 8, "seed": 3}}[kind]
        return kdcache.dump_teacher(models.tiny_lm(), models.tokens(), tmp_path / kind, vocab_size=40, batch_size=16,
                                    **sparse, **quiet)
    if kind in ("views", "explicit-views"):
        ds = models.augmented() if kind == "views" else models.param_augmented()
        return kdcache.dump_teacher(models.teacher(), ds, tmp_path / kind, views=3, seed=5, hidden=["body"], **quiet)
    dtype = "bfloat16" if kind == "bfloat16" else "float16"
    return kdcache.dump_teacher(models.teacher(), models.dataset(100), tmp_path / kind, hidden=["body", "head"],
                                logits_dtype=dtype, hidden_dtype="float32", **quiet)


def test_cache_meta_round_trips_through_attrs_for_every_kind_of_cache(dumped):
    raw = _recorded(dumped.path)
    meta = CacheMeta.from_attrs(raw, dumped.path)
    assert meta == dumped.meta  # what the dump kept in memory is what a reader parses
    assert meta.to_attrs() == raw  # and writing it back changes nothing on disk
    assert CacheMeta.from_attrs(meta.to_attrs(), "x") == meta


@pytest.mark.parametrize("name", ["format2-digits", "format2-topk"])
def test_caches_written_by_the_previous_release_round_trip_exactly(name):
    raw = _recorded(FIXTURES / name)
    assert raw["format_version"] == 2
    assert TeacherCache.open(FIXTURES / name).meta.to_attrs() == raw


def test_a_format2_cache_of_the_previous_release_opens_trains_and_stays_a_cache_hit(tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(FIXTURES / "format2-digits", cache)
    opened = TeacherCache.open(cache)
    assert opened.complete and opened.rows == 1200 and opened.hidden_names == ["features"]
    assert opened.verify() == []
    result = kdcache.train_student(digits.student(), digits.transfer(), cache, epochs=2,
                                   hints=["features=features:mse@0.1"], progress=False)
    assert len(result.metrics) == 2 and result.final["kd"] > 0
    teacher = digits.student(width=16)
    teacher.load_state_dict(torch.load(FIXTURES / "format2-digits-teacher.pt", weights_only=True))
    said: list[str] = []
    again = kdcache.dump_teacher(teacher, digits.transfer(), cache, hidden=["features"], progress=False, log=said.append)
    assert said == [f"cache hit: {cache}"] and again.fingerprint == opened.fingerprint


def test_a_format2_topk_cache_of_the_previous_release_reads_its_targets(models):
    data = CachedTeacherDataset(models.tokens(), FIXTURES / "format2-topk")
    _, _, teacher = data.loader(8, shuffle=False).__iter__().__next__()
    assert teacher.logits.values.shape == (8, 12, 4) and teacher.logits.indices.max() < 40
    assert torch.equal(teacher.mask, teacher["mask"])


FINGERPRINTS = json.loads((FIXTURES / "fingerprints-format2.json").read_text())


@pytest.mark.parametrize("name", sorted(FINGERPRINTS))
def test_fingerprint_of_every_earlier_dump_configuration_is_unchanged(name):
    case = FINGERPRINTS[name]
    settings = {k: v for k, v in case["kwargs"].items() if k != "batch_size"}
    config = DumpConfig.from_mapping(settings)
    choices = config.fingerprint_inputs(case["choices"]["amp"], case["choices"].get("explicit_params", False))
    assert choices == case["choices"]
    assert fingerprint(case["weights_digest"], case["dataset_digest"], choices) == case["fingerprint"]


def test_a_run_option_does_not_change_the_fingerprint_but_a_stored_choice_does():
    base = DumpConfig().fingerprint_inputs("none", False)
    assert DumpConfig(batch_size=7, num_workers=2, writer_threads=1, block_rows=64).fingerprint_inputs("none", False) == base
    assert DumpConfig(mask_key="mask").fingerprint_inputs("none", False) != base


def _malformed(mutate):
    raw = copy.deepcopy(_recorded(FIXTURES / "format2-digits"))
    mutate(raw)
    return raw


MALFORMED = {
    "no fingerprint": lambda a: a.pop("fingerprint"),
    "fingerprint not hex": lambda a: a.update(fingerprint="../../etc/passwd"),
    "no rows": lambda a: a.pop("rows"),
    "rows a string": lambda a: a.update(rows="1200"),
    "rows negative": lambda a: a.update(rows=-5),
    "rows absurd": lambda a: a.update(rows=1 << 62),
    "rows not length x views": lambda a: a.update(rows=1201),
    "blocks disagree": lambda a: a.update(blocks=99),
    "block rows zero": lambda a: a.update(block_rows=0),
    "no teacher": lambda a: a.pop("teacher"),
    "teacher a list": lambda a: a.update(teacher=[1]),
    "no dataset digest": lambda a: a["dataset"].pop("digest"),
    "dataset length a float": lambda a: a["dataset"].update(length=1200.0),
    "no outputs": lambda a: a.pop("outputs"),
    "no logits output": lambda a: a["outputs"].pop("logits"),
    "shape negative": lambda a: a["outputs"]["logits"].update(shape=[-10]),
    "shape absurd": lambda a: a["outputs"]["logits"].update(shape=[1 << 40]),
    "shape a dict": lambda a: a["outputs"]["logits"].update(shape={"a": 1}),
    "unknown codec": lambda a: a["outputs"]["logits"]["codec"].update(name="pickle"),
    "codec extra parameter": lambda a: a["outputs"]["logits"]["codec"].update(module="os"),
    "dense dtype unknown": lambda a: a["outputs"]["logits"]["codec"].update(dtype="object"),
    "array path elsewhere": lambda a: a["outputs"]["logits"]["arrays"][""].update(path="../../x"),
    "array dtype other than its codec's": lambda a: a["outputs"]["logits"]["arrays"][""].update(stored_dtype="int16"),
    "array shape other than the output's": lambda a: a["outputs"]["logits"]["arrays"][""].update(shape=[11]),
    "chunk rows not dividing blocks": lambda a: a["outputs"]["logits"]["arrays"][""].update(chunk_rows=3),
    "hidden name a path": lambda a: a["outputs"].update({"../x": a["outputs"].pop("features")}),
    "complete a string": lambda a: a.update(complete="yes"),
    "vocab larger than logits": lambda a: a.update(vocab={"real": 10, "padded": 11}),
    "views without a seed": lambda a: a.update(views=2, rows=2400, blocks=2),
    "no amp": lambda a: a.pop("amp"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_attrs_are_one_line_errors(case):
    with pytest.raises(KdcacheError) as err:
        CacheMeta.from_attrs(_malformed(MALFORMED[case]), "c")
    assert "\n" not in str(err.value) and str(err.value).startswith("c")


def test_every_field_missing_is_one_line_naming_it():
    raw = _recorded(FIXTURES / "format2-digits")
    required = ["fingerprint", "rows", "block_rows", "blocks", "teacher", "dataset", "outputs", "amp", "versions",
                "complete", "format_version"]
    for key in required:
        broken = {k: v for k, v in raw.items() if k != key}
        with pytest.raises(KdcacheError, match=re.escape(key)):
            CacheMeta.from_attrs(broken, "c")


def test_malformed_attrs_on_disk_are_one_line_from_the_cli(tmp_path):
    shutil.copytree(FIXTURES / "format2-digits", tmp_path / "c")
    meta_file = tmp_path / "c" / "zarr.json"
    doc = json.loads(meta_file.read_text())
    doc["attributes"]["kdcache"]["outputs"]["logits"]["shape"] = [-3]
    meta_file.write_text(json.dumps(doc))
    for command in ("info", "verify"):
        result = run_cli(command, str(tmp_path / "c"))
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("kdcache: error:"), result.stderr
        assert "malformed" in lines[0] and "outputs.logits.shape" in lines[0]


def test_dump_config_from_toml_equals_the_same_flags(tmp_path, models_file):
    toml = tmp_path / "dump.toml"
    toml.write_text(f'teacher = "{models_file}:teacher"\ndataset = "{models_file}:dataset"\n'
                    'hidden = ["body"]\nlogits-dtype = "float32"\nbatch_size = 32\nblock_rows = 64\nprogress = false\n'
                    f'cache_root = "{tmp_path / "root"}"\n[dataset_kwargs]\nn = 120\n')
    values = tomllib.loads(toml.read_text())
    assert DumpConfig.from_mapping({k: values[k] for k in ("hidden", "logits-dtype", "batch_size", "block_rows")}) == \
        DumpConfig(hidden=("body",), logits_dtype="float32", batch_size=32, block_rows=64)
    by_file = run_cli("dump-teacher", "--config", str(toml))
    by_flags = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                       "--dataset-kwargs", '{"n": 120}', "--hidden", "body", "--logits-dtype", "float32",
                       "--batch-size", "32", "--block-rows", "64", "--no-progress", "--cache-root",
                       str(tmp_path / "root"))
    assert by_file.returncode == 0 and by_flags.returncode == 0, by_file.stderr + by_flags.stderr
    assert by_file.stdout == by_flags.stdout and "cache hit" in by_flags.stderr  # one fingerprint, one cache


def test_flags_override_the_config_file(tmp_path, models_file):
    toml = tmp_path / "dump.toml"
    toml.write_text(f'teacher = "{models_file}:teacher"\ndataset = "{models_file}:dataset"\nlogits_dtype = "int8"\n')
    bad = run_cli("dump-teacher", "--config", str(toml), "--out", str(tmp_path / "c"), "--no-progress")
    assert bad.returncode == 2 and "dtype 'int8' is not one of" in bad.stderr
    good = run_cli("dump-teacher", "--config", str(toml), "--logits-dtype", "float32", "--out", str(tmp_path / "c"),
                   "--no-progress")
    assert good.returncode == 0 and TeacherCache.open(tmp_path / "c").meta.logits.codec.dtype == "float32"


def test_no_code_outside_format_reads_cache_attrs_by_string_key():
    offenders = []
    for file in sorted((REPO / "kdcache").rglob("*.py")) + sorted((REPO / "scripts").glob("*.py")):
        if file.relative_to(REPO).as_posix() == "kdcache/format/attrs.py":  # the one home of the attrs' keys
            continue
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if 'meta["' in line or 'attrs["' in line or "meta.get(" in line:
                offenders.append(f"{file.relative_to(REPO)}:{number}")
    assert offenders == []
