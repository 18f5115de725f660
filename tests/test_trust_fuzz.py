"""Seeded fuzz of the inputs a user hands kdcache besides caches (issue "A shared cache can be
trusted, round three"): every TOML key of both commands set to hostile values, and sampled byte
and JSON mutations of a vLLM import file. Each either works or is one ``KdcacheError``: never
another exception (a traceback on the command line), a hang or an unbounded allocation."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest

from kdcache import KdcacheError
from kdcache.config import DumpConfig, TrainConfig
from kdcache.interop import import_vllm

HOSTILE = [2 ** 62, -(2 ** 62), 2 ** 80, -1, 0, 1e308, float("nan"), float("inf"), "x", "", [], [2 ** 62], {},
           {"a": 1}, True, None]


@pytest.mark.parametrize("settings", [DumpConfig, TrainConfig])
def test_every_config_key_takes_hostile_values_as_one_line_or_a_value_in_range(settings):
    for f in fields(settings):
        for value in HOSTILE:
            try:
                config = settings.from_mapping({f.name: value})
            except KdcacheError:
                continue
            got = getattr(config, f.name)
            if isinstance(got, int) and not isinstance(got, bool):
                assert -(2 ** 63) <= got < 2 ** 63 and (f.name not in ("batch_size", "block_rows", "views", "num_workers",
                                                                     "writer_threads", "epochs") or got <= 1 << 24)


def test_mutated_vllm_files_import_or_give_one_line(tmp_path):
    rng = np.random.default_rng(27)
    records = []
    for n in range(6):
        ids = rng.integers(0, 30, rng.integers(2, 9)).tolist()
        positions: list = [None]
        for _ in ids[1:]:
            kept = rng.choice(30, 4, replace=False)
            lp = np.log(rng.dirichlet(np.ones(5))[:4])
            positions.append({str(int(t)): {"logprob": float(v), "rank": r + 1} for r, (t, v) in enumerate(zip(kept, lp))})
        records.append({"prompt_token_ids": ids, "prompt_logprobs": positions})
    text = "".join(json.dumps(r) + "\n" for r in records)
    values = [None, -1, 2 ** 70, 1e400, "7", [1, [2]], {"x": None}, True, 0.5, "NaN"]
    outcomes = {"imported": 0, "refused": 0}
    for case in range(40):
        if case % 2:  # bytes flipped, cut or doubled
            data = bytearray(text.encode())
            for _ in range(rng.integers(1, 4)):
                data[rng.integers(len(data))] = int(rng.integers(256))
            data = data[:rng.integers(len(data) // 2, len(data) + 1)] if case % 4 == 1 else data
        else:  # one JSON value replaced somewhere in one record
            doc = json.loads(json.dumps(records))
            record = doc[rng.integers(len(doc))]
            key = ["prompt_token_ids", "prompt_logprobs"][rng.integers(2)]
            target = record[key]
            at = int(rng.integers(len(target)))
            value = values[rng.integers(len(values))]
            if key == "prompt_logprobs" and isinstance(target[at], dict) and rng.integers(2):
                entry = target[at][next(iter(target[at]))]
                entry["logprob"] = value
            else:
                target[at] = value
            data = bytearray("".join(json.dumps(r) + "\n" for r in doc).encode())
        source = tmp_path / f"f{case}.jsonl"
        source.write_bytes(bytes(data))
        try:
            import_vllm(source, tmp_path / f"c{case}", vocab_size=32)
            outcomes["imported"] += 1
        except KdcacheError as err:
            assert "\n" not in str(err)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 10, outcomes
