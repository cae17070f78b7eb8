"""The expert library on disk: round trip, stable stacking, atomic writes, and every refusal."""

import json

import numpy as np
import pytest

from phatgoose_jax import cli, library
from test_adapters import random_expert


@pytest.fixture(scope="module")
def base(tiny_model):
  model, params = tiny_model
  return model.module.config, params


def test_round_trip_and_stable_stacking(base, tmp_path):
  config, params = base
  experts = [random_expert(n, s, config, params) for n, s in (("zeta", 1), ("alpha", 2), ("mid", 3))]
  lib = library.ExpertLibrary(tmp_path / "lib", create=True)
  for e in experts:
    lib.add(e)
  assert lib.names() == ["alpha", "mid", "zeta"]
  for e in experts:
    back = lib.get(e.name)
    assert back.metadata() == {**e.metadata(), "created": back.created}
    for k, v in e.tensors.items():
      np.testing.assert_array_equal(back.tensors[k], v)
  stacked = lib.stack()
  assert stacked.names == ["alpha", "mid", "zeta"]  # sorted: independent of the order of adds
  site = "decoder/layers_2/encoder_decoder_attention/value"
  np.testing.assert_array_equal(stacked.lora_a[site][2], experts[0].tensors[f"{site}/lora_a"])
  assert stacked.lora_a[site].shape == (3, 16, 4) and stacked.gate[site].shape == (3, 16)
  explicit = lib.stack(["zeta", "alpha"])
  np.testing.assert_array_equal(explicit.gate[site][0], experts[0].tensors[f"{site}/gate"])
  # Adding an expert leaves the others' files untouched.
  before = {p: p.stat().st_mtime_ns for p in (tmp_path / "lib").rglob("*") if p.is_file()}
  lib.add(random_expert("new", 9, config, params))
  assert all(p.stat().st_mtime_ns == t for p, t in before.items())
  lib.remove("mid")
  assert lib.names() == ["alpha", "new", "zeta"]
  assert [p.name for p in (tmp_path / "lib").iterdir() if p.name.startswith(".")] == [".lock"]  # no temporary left


def _with(expert, **changes):
  return library.Expert(**{**expert.__dict__, **changes})


def test_refusals_name_the_expert(base, tmp_path):
  config, params = base
  good = random_expert("good", 1, config, params)
  lib = library.ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(good)
  other = random_expert("other", 2, config, params)
  no_gates = _with(other, name="nogates", tensors={k: v for k, v in other.tensors.items() if not k.endswith("/gate")})
  cases = [
      (_with(other, name="otherbase", base_model="0123456789abcdef"), r"expert 'otherbase' has base_model '0123"),
      (random_expert("rank2", 3, config, params, rank=2), r"expert 'rank2' has rank 2, but 'good' has 4: experts of one library must share it"),
      (random_expert("enconly", 4, config, params, sites="encoder/.*"),
       r"expert 'enconly' has a different site set than 'good'"),
      (no_gates, r"expert 'nogates' has no gate vectors"),
      (_with(other, name="good"), r"expert 'good' already exists"),
  ]
  snapshot = sorted(str(p) for p in (tmp_path / "lib").rglob("*"))
  for expert, message in cases:
    with pytest.raises(library.LibraryError, match=message):
      lib.add(expert)
  assert sorted(str(p) for p in (tmp_path / "lib").rglob("*")) == snapshot  # nothing written
  with pytest.raises(library.LibraryError, match="lora_a .* do not have rank 4"):
    bad = dict(good.tensors)
    site = good.sites[0]
    bad[f"{site}/lora_a"] = bad[f"{site}/lora_a"][:, :2]
    _with(good, name="broken", tensors=bad).check()
  with pytest.raises(library.LibraryError, match="no experts to stack: the library is empty"):
    library.ExpertLibrary(tmp_path / "empty", create=True).stack()
  with pytest.raises(library.LibraryError, match="expert library .* does not exist"):
    library.ExpertLibrary(tmp_path / "missing")


def test_half_written_and_corrupt_experts(base, tmp_path):
  config, params = base
  lib = library.ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(random_expert("ok", 1, config, params))
  # A crash mid-write leaves only a hidden temporary directory, which is not an expert.
  (tmp_path / "lib" / ".partial.tmp-1-abc").mkdir()
  assert lib.names() == ["ok"]
  (tmp_path / "lib" / "ok" / "adapter.safetensors").write_bytes(b"\x00" * 10)
  with pytest.raises(library.LibraryError, match="adapter.safetensors is corrupt or truncated"):
    lib.validate()


def test_library_cli(base, tmp_path, capsys):
  config, params = base
  src = library.save_expert(random_expert("cli_expert", 5, config, params), tmp_path / "run" / "expert")
  lib = tmp_path / "lib"
  assert cli.main(["library", "add", str(lib), str(src)]) == 0
  assert cli.main(["library", "add", str(lib), str(src), "--name", "copy"]) == 0
  assert cli.main(["library", "list", str(lib)]) == 0
  out = capsys.readouterr().out
  assert "cli_expert" in out and "copy" in out and "2 expert(s)" in out
  assert cli.main(["library", "validate", str(lib)]) == 0
  assert "consistent" in capsys.readouterr().out
  assert cli.main(["library", "remove", str(lib), "copy"]) == 0
  assert cli.main(["library", "remove", str(lib), "copy"]) == 1
  assert "no expert named 'copy'" in capsys.readouterr().err
  meta = json.loads((lib / "cli_expert" / "expert.json").read_text())
  assert meta["rank"] == 4 and meta["has_gates"] and meta["base_model"] == library.base_model_fingerprint(params)
