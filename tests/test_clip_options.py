"""Every command that reads clips spells, explains and checks --frames, --size, --fps and --buckets the same way."""

import importlib

import pytest

from data.clip_options import check_clip_options


def commands(tmp):
    """(name, main, the arguments each command needs besides the clip options) for every command with them."""
    return {
        "train.py": ("train", ["--stage", "tokenizer", "--data", str(tmp), "--out", str(tmp / "run")]),
        "tokenizer.encode": ("tokenizer.encode", ["--ckpt", str(tmp / "no-ckpt"), "--data", str(tmp),
                                                  "--out", str(tmp / "latents")]),
        "tokenizer.evaluate": ("tokenizer.evaluate", ["--ckpt", str(tmp / "no-ckpt"), "--data", str(tmp),
                                                      "--out", str(tmp / "eval")]),
        "data.check_shards": ("data.check_shards", [str(tmp)]),
        "data.synthetic": ("data.synthetic", ["--out", str(tmp / "synthetic"), "--num", "2"]),
        "sample.py": ("sample", ["--ckpt", str(tmp / "no-run"), "--prompt", "x", "--out", str(tmp / "s")]),
        "evaluation.generator": ("evaluation.generator", ["--videos", str(tmp), "--out", str(tmp / "g")]),
    }


BAD = {
    ("--frames", "16"): "error: --frames must be 1 + 4k",
    ("--size", "0"): "error: --size takes one side (a square) or two",
    ("--size", "8", "8", "8"): "error: --size takes one side (a square) or two",
    ("--fps", "0"): "error: --fps must be a positive frame rate",
    ("--fps", "nan"): "error: --fps must be a positive frame rate",
    ("--fps", "-24"): "error: --fps must be a positive frame rate",
    ("--buckets", "no-such-bucket-file.txt"): "error: --buckets no-such-bucket-file.txt: neither a preset",
}


@pytest.mark.parametrize("bad", list(BAD), ids=lambda b: " ".join(b))
def test_every_command_rejects_a_bad_clip_option_with_the_same_line(bad, tmp_path, capsys):
    lines = {}
    for name, (module, needed) in commands(tmp_path).items():
        main = importlib.import_module(module).main
        if not _has_option(main, bad[0], capsys):
            continue
        assert main(needed + list(bad)) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1, (name, err)  # one line, no traceback
        lines[name] = err
    assert len(lines) >= 2, f"only {sorted(lines)} take {bad[0]}"
    assert set(lines.values()) == {next(iter(lines.values()))}, lines  # the same words from every command
    assert next(iter(lines.values())).startswith(BAD[bad])


def _has_option(main, option, capsys) -> bool:
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    return f"[{option} " in usage


def test_each_clip_option_is_declared_by_the_shared_group_with_one_help():
    """A command may word its own help (sample.py's --frames defaults to the run's), but no command declares the
    options itself: the source of every command names add_clip_options, and none spells add_argument("--frames"."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = ["training/options.py", "tokenizer/encode.py", "tokenizer/evaluate.py", "data/check_shards.py",
               "data/synthetic.py", "sample.py", "evaluation/generator.py"]
    for source in sources:
        text = (root / source).read_text()
        assert "add_clip_options(" in text, source
        for option in ("--frames", "--size", "--fps", "--buckets"):
            assert f'add_argument("{option}"' not in text, (source, option)


def test_check_clip_options_normalises_in_place():
    import argparse

    args = argparse.Namespace(frames=17, size=[48, 80], fps=29.97, buckets="64p", batch_size=4)
    check_clip_options(args)
    assert args.size == (48, 80)
    args = argparse.Namespace(frames=None, size=64, fps=None)  # None: the command takes the value from elsewhere
    check_clip_options(args)
    assert args.size == (64, 64)
    with pytest.raises(Exception, match="use 13 or 17"):
        check_clip_options(argparse.Namespace(frames=16))
