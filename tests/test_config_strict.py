"""--config files are untrusted input: read with limits (size, UTF-8, depth, no YAML aliases, no
duplicate keys, no NaN/Infinity) and each value checked against its option's type before use, so
every mistake is one line naming the file and the key (issue 26, item 11 and the weak config cases)."""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc

import pytest

from chx.config import MAX_BYTES, config_values
from chx.errors import ChxError
from helpers import ROOT, run_chx

# nine levels of nine aliases: 9**9 (387 million) "lol"s from a 500-byte file
LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

# (file name, contents, what the one line says): each a weak case of the adversarial review
CASES = [
    ("laughs.yaml", LAUGHS, "YAML aliases (*name) are not allowed"),
    ("alias.yaml", "seed: &s 3\nepochs: *s\n", "YAML aliases (*name) are not allowed"),
    ("merge.yaml", "base: &b {epochs: 1}\n<<: *b\n", "YAML aliases (*name) are not allowed"),
    ("batch.yaml", "batch_size: 2.7\n", "'batch_size' (--batch-size) takes a whole number, not 2.7"),
    ("batch.json", '{"batch-size": 2.7}', "'batch-size' (--batch-size) takes a whole number, not 2.7"),
    ("batch_str.yaml", "batch_size: '2.7'\n", "takes a whole number"),
    ("inf.yaml", "epochs: .inf\n", "'epochs' (--epochs) is inf; give a finite number"),
    ("inf_int.yaml", "batch_size: .inf\n", "is inf; give a finite number"),
    ("nan.yaml", "lr: .nan\n", "'lr' (--lr) is nan; give a finite number"),
    ("inf_str.yaml", "lr: inf\n", "'lr' (--lr) is inf; give a finite number"),
    ("inf.json", '{"epochs": Infinity}', "Infinity is not a number an option takes"),
    ("nan.json", '{"lr": NaN}', "NaN is not a number an option takes"),
    ("scalar.yaml", "manifest: covid.parquet\n", "'manifest' (--manifest) takes a list (manifest: [covid.parquet])"),
    ("scalar.json", '{"images": 3}', "'images' (--images) takes a list"),
    ("deep.yaml", "epochs: " + "[" * 20000 + "]" * 20000 + "\n", "values nest too deeply"),
    ("deep.json", '{"epochs": ' + "[" * 20000 + "]" * 20000 + "}", "values nest too deeply"),
    ("deep_map.yaml", "epochs:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 60)), "values nest too deeply"),
    ("binary.yaml", b"\x7fELF\x02\x01\x01\x00\xff\xfe\x00\x00", "is not UTF-8 text (byte"),
    ("binary.json", b"\xff\xd8\xff\xe0\x00\x10JFIF", "is not UTF-8 text (byte"),
    ("nul.yaml", "epochs: 1\n\x00\n", "holds a NUL byte"),
    ("dup.yaml", "epochs: 1\nlr: 0.1\nepochs: 2\n", "key 'epochs' is given twice (line 3)"),
    ("dup.json", '{"epochs": 1, "lr": 0.1, "epochs": 2}', "key 'epochs' is given twice"),
    ("flag.yaml", "pretrained: maybe\n", "'pretrained' (--pretrained) takes true or false, not the string 'maybe'"),
    ("flag.json", '{"tta": 1}', "'tta' (--tta) takes true or false, not the number 1"),
    ("norway.yaml", "device: no\n", "'device' (--device) takes a string, not the boolean false; quote it"),
    ("dict.yaml", "model: {name: x}\n", "'model' (--model) takes a string, not the mapping"),
    ("list.json", '{"epochs": [1, 2]}', "'epochs' (--epochs) takes a number, not the list [1, 2]"),
    ("choice.yaml", "resize: crop\n", "'resize' (--resize): "),
    ("range.json", '{"size": 16}', "'size' (--size): 16 is not in the range x>=32"),
    ("str_int.yaml", "batch_size: lots\n", "takes a whole number, not the string 'lots'"),
]


def _write(tmp_path, name, text):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _one_line(code, err, expected, path):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert expected in lines[0] and str(path) in lines[0], lines[0]


@pytest.mark.parametrize("name, text, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_naming_file_and_key(capsys, tmp_path, name, text, expected):
    path = _write(tmp_path, name, text)
    code, _, err = run_chx(capsys, "train-backbone", "--config", path, "-o", tmp_path / "run")
    _one_line(code, err, expected, path)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train-fusion", "train-joint", "extract-features", "evaluate"])
def test_other_commands_check_their_config_the_same_way(capsys, tmp_path, command):
    for name, text, expected in [("b.yaml", LAUGHS, "YAML aliases"), ("d.json", '{"workers": 1, "workers": 2}',
                                                                        "key 'workers' is given twice"),
                                 ("w.yaml", "workers: 2.5\n", "'workers' (--workers) takes a whole number")]:
        path = _write(tmp_path, name, text)
        code, _, err = run_chx(capsys, command, "--config", path)
        _one_line(code, err, expected, path)


def test_billion_laughs_is_refused_fast_and_small(tmp_path):
    path = _write(tmp_path, "laughs.yaml", LAUGHS)
    assert len(LAUGHS) < 600
    from chx.cli import _option_specs, cli

    specs = _option_specs(cli.commands["train-backbone"])
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ChxError, match="aliases"):
        config_values(path, "train-backbone", specs)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 20 * 2**20, (elapsed, peak)


def test_oversized_config_is_refused_before_parsing(capsys, tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * (MAX_BYTES // 10 + 1))
    code, _, err = run_chx(capsys, "train-backbone", "--config", path)
    _one_line(code, err, "MiB; a config file of options is a few kB", path)


def test_good_values_are_taken_as_the_command_line_would(tmp_path):
    """Whole floats for ints, numbers written as strings (YAML reads `1e-3` as one), digits for a
    string option; a list for a repeatable option; null leaves the default."""
    from chx.cli import _option_specs, cli

    specs = _option_specs(cli.commands["train-backbone"])
    path = _write(tmp_path, "ok.yaml", "batch_size: 4.0\nlr: 1e-3\nwarmup: 0\ndevice: 0\nseed: '7'\n"
                                       "manifest: [a.parquet, b.parquet]\ntta: false\nmax_steps: null\n")
    values = config_values(path, "train-backbone", specs)
    assert values == {"batch_size": 4, "lr": 1e-3, "warmup": 0, "device": "0", "seed": 7,
                      "manifests": ["a.parquet", "b.parquet"], "tta": False, "max_steps": None}
    assert type(values["batch_size"]) is int and type(values["seed"]) is int
    json_path = _write(tmp_path, "ok.json", '{"batch-size": 4, "lr": 0.001, "epochs": 2.5}')
    assert config_values(json_path, "train-backbone", specs) == {"batch_size": 4, "lr": 1e-3, "epochs": 2.5}


def test_bad_config_through_the_console_entry_point(tmp_path):
    """The real process: exit 2, one line on stderr, quickly (the 495-byte file took 28 s and 4 GB)."""
    bad = _write(tmp_path, "bad.yaml", LAUGHS)
    dup = _write(tmp_path, "dup.json", '{"epochs": 1, "epochs": 2}')
    for path, expected in ((bad, "YAML aliases"), (dup, "given twice")):
        r = subprocess.run([sys.executable, "-m", "chx", "train-backbone", "--config", str(path), "-o",
                            str(tmp_path / "run")], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], r.stderr
