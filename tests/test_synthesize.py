"""`stm synthesize` on a real local Ray (2 CPUs): byte-identical shards with stable names across runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import synthesize as syn
from stm_core.data import BuiltinImagesConfig, decode_clip, write_builtin_images


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_synthesize_is_deterministic(tmp_path, ray_2cpu):
    (tmp_path / ".git").mkdir()
    write_builtin_images(tmp_path / "data/raw/builtin-images", BuiltinImagesConfig(count=10, size=64), seed=0)
    params = {"synthesize": {"sets": {"stm": {"frames": 3, "clips": 18}, "strmn": {"frames": 5, "clips": 6}},
                             "height": 48, "width": 48, "clips_per_shard": 6, "num_actors": 2},
              "ray": {"num_cpus": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    results = syn.run_synthesize(tmp_path / "params.yaml")
    assert [r["set"] for r in results] == ["stm", "strmn"]
    out = tmp_path / "data/synthetic"
    first = _digests(out / "stm")
    assert sorted(first) == ["_manifest.json", "clips-00000-0.parquet", "clips-00001-0.parquet",
                             "clips-00002-0.parquet"]
    # Second run, different actor count: same bytes, same names (what DVC hashes).
    p = syn.section(syn.load_params(tmp_path / "params.yaml"), "synthesize", syn.SynthesizeParams)
    roots = syn.source_roots(p, tmp_path)
    syn.synthesize_set("stm", 3, 18, p, roots, tmp_path / "again", num_actors=1)
    assert _digests(tmp_path / "again") == first
    assert not list(out.glob(".*"))  # no temp folders left

    ids = []
    for shard in sorted((out / "stm").glob("*.parquet")):
        table = pq.read_table(shard)
        ids += table.column("clip_id").to_pylist()
        row = table.slice(0, 1).to_pylist()[0]
        frames, masks, n = decode_clip(row)
        assert frames.shape == (3, 3, 48, 48) and masks.shape == (3, 48, 48) and 1 <= n <= 3
        assert row["height"] == 48 and row["n_frames"] == 3
    assert ids == list(range(18))
    strmn = pq.read_table(out / "strmn").slice(0, 1).to_pylist()[0]
    assert strmn["n_frames"] == 5 and len(strmn["frames"]) == 5


def test_missing_source_is_a_clear_error(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"synthesize": {"sources": ["msra10k"]}}))
    with pytest.raises(syn.DataError, match=r"msra10k: not a static image set.*stm download"):
        syn.run_synthesize(tmp_path / "params.yaml")
