"""Teachers larger than one GPU: hf: teachers loaded by a device map (accelerate's big-model
loading), here forced across the CPU and disk offload, dump the cache of the same teacher loaded
whole: the same weights digest, fingerprint and bytes."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")

import hf_helpers  # noqa: E402
from conftest import run_cli, store_files  # noqa: E402

import kdcache  # noqa: E402
from kdcache import KdcacheError  # noqa: E402
from kdcache.data.hf import load  # noqa: E402
from kdcache.models.hf import load_pretrained, load_tokenizer  # noqa: E402
from kdcache.models.placement import device_map_value, is_dispatched, offloaded_weights  # noqa: E402
from kdcache.store.identity import weights_digest  # noqa: E402

# GPT-2's parts spread over the CPU and disk; the tied embedding and head stay together
SPREAD = {"transformer.wte": "cpu", "transformer.wpe": "disk", "transformer.drop": "cpu", "transformer.h.0": "disk",
          "transformer.h.1": "cpu", "transformer.h.2": "disk", "transformer.ln_f": "disk", "lm_head": "cpu"}


def _rows(tmp_path, teacher_dir):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in hf_helpers.TEXTS[:24]))
    return data, load(f"jsonl:{data}", tokenizer=load_tokenizer(f"hf:{teacher_dir}"), text_column="text", max_length=12)


def _offloaded(model) -> int:
    return sum(p.device.type == "meta" for p in model.state_dict().values())


def test_a_teacher_spread_over_the_cpu_and_disk_by_max_memory_dumps_the_cache_of_the_whole_teacher(tmp_path):
    teacher_dir = hf_helpers.save_lm(tmp_path / "teacher", layers=3, width=32)
    _, rows = _rows(tmp_path, teacher_dir)
    whole = load_pretrained(f"hf:{teacher_dir}")
    spread = load_pretrained(f"hf:{teacher_dir}", device_map="auto", max_memory={"cpu": 60_000},
                             offload_folder=tmp_path / "offload")
    assert is_dispatched(spread) and {"cpu", "disk"} <= set(spread.hf_device_map.values()) and _offloaded(spread) > 0
    assert weights_digest(whole) == weights_digest(spread, offloaded=offloaded_weights(spread))
    quiet = {"topk": 8, "batch_size": 8, "progress": False, "log": lambda m: None}
    a = kdcache.dump_teacher(whole, rows, tmp_path / "whole", **quiet)
    b = kdcache.dump_teacher(spread, rows, tmp_path / "spread", **quiet)
    assert a.fingerprint == b.fingerprint and a.meta.teacher.weights_digest == b.meta.teacher.weights_digest
    assert store_files(tmp_path / "spread") == store_files(tmp_path / "whole")
    assert _offloaded(spread) > 0  # still dispatched: the dump moved nothing


def test_dump_teacher_device_map_json_loads_across_cpu_and_disk_and_is_a_cache_hit_of_the_whole_teacher(tmp_path):
    teacher_dir = hf_helpers.save_lm(tmp_path / "teacher", layers=3, width=32)
    data, _ = _rows(tmp_path, teacher_dir)
    common = ["dump-teacher", "--teacher", f"hf:{teacher_dir}", "--dataset", f"jsonl:{data}", "--text-column", "text",
              "--max-length", "12", "--topk", "8", "--batch-size", "8", "--no-progress"]
    whole = run_cli(*common, "--cache-root", str(tmp_path / "root"))
    assert whole.returncode == 0, whole.stderr
    spread = run_cli(*common, "--cache-root", str(tmp_path / "root"), "--device-map", json.dumps(SPREAD))
    assert spread.returncode == 0, spread.stderr
    assert "cache hit" in spread.stderr and spread.stdout == whole.stdout  # the same fingerprint


@pytest.mark.parametrize("bad", ["everywhere", "[1, 2]", "{}", '{"lm_head": "gpu"}', '{"lm_head": -1}',
                                 '{"../x": "cpu"}', '{"lm_head": true}'])
def test_a_device_map_that_is_not_one_is_refused_naming_the_argument(bad):
    with pytest.raises(KdcacheError, match="device_map"):
        device_map_value(bad)


def test_a_device_map_that_is_not_one_is_one_line_naming_the_flag(tmp_path):
    teacher_dir = hf_helpers.save_lm(tmp_path / "teacher")
    done = run_cli("dump-teacher", "--teacher", f"hf:{teacher_dir}", "--dataset", "jsonl:nowhere.jsonl",
                   "--device-map", '{"lm_head": "gpu"}', "--out", str(tmp_path / "c"))
    assert done.returncode == 2 and "--device-map" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_device_map_takes_an_hf_teacher_as_saved(tmp_path, models_file):
    done = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                   "--device-map", "auto", "--out", str(tmp_path / "c"))
    assert done.returncode == 2 and "--device-map loads an hf:PATH teacher" in done.stderr


def test_placed_teacher_accepted_maps_are_accelerates_own_and_module_maps():
    assert device_map_value("balanced") == "balanced"
    assert device_map_value('{"": 0}') == {"": 0}
    assert device_map_value({"model.layers.0": "cuda:1", "lm_head": "disk"}) == {"model.layers.0": "cuda:1",
                                                                                 "lm_head": "disk"}
    assert not is_dispatched(torch.nn.Linear(2, 2))
