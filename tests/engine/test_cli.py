"""The ``citi`` command line: fast help, validate, finetune -> chat / PeftModel / export, bad data, importance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from citi_engine.cli.main import main
from tests.engine.test_train import WEATHER, tiny_model, tool_example, write_data, write_jsonl  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--batch-size", "2", "--max-length", "192", "--importance-examples", "4", "--num-experts", "2",
         "--rank", "4", "--eval-examples", "0", "--eval-probes", "0", "--eval-humaneval", "0",
         "--test-fraction", "0", "--checkpoint-every", "0"]


def test_help_is_fast_and_does_not_import_torch():
    code = ("import sys\nfrom citi_engine.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "for name in ('finetune', 'chat'):\n"
            "    try:\n        main([name, '--help'])\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'citi --help imported torch'\n"
            "assert 'transformers' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("finetune", "importance", "chat", "validate", "export"):
        assert command in out.stdout
    assert "--lr-molora" in out.stdout and "Paper: 2e-4" in out.stdout  # flags carry the config's help


def test_validate_prints_each_problem_as_line_code_message(tmp_path, capsys):
    rows = [tool_example(i) for i in range(12)]
    rows[1] = "[1, 2]"
    rows[5]["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["validate", bad]) == 2  # bad data is a problem the user can fix: 2, as the help says
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("line 2: not_an_object: ") for line in out)
    assert any(line.startswith("line 6: invalid_arguments_json: ") for line in out)

    good = write_data(tmp_path)
    assert main(["validate", good, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["n_tool"] == 16 and report["n_general"] == 6


def test_finetune_with_bad_data_exits_nonzero_listing_line_code_messages(tiny_model, tmp_path, capsys):  # noqa: F811
    rows = [tool_example(i) for i in range(12)]
    rows[3] = "not json at all"
    rows[9]["messages"][0]["role"] = "narrator"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    code = main(["finetune", "--model", tiny_model, "--data", bad, "--out", str(tmp_path / "out"), "--quiet", *SMALL])
    assert code == 2
    err = capsys.readouterr().err
    assert "line 4: invalid_json: " in err and "line 10: unknown_role: " in err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_finetune_refuses_impossible_settings_without_loading_anything(tmp_path, capsys):
    data = write_data(tmp_path)
    code = main(["finetune", "--data", data, "--out", str(tmp_path / "o"), "--molora-fraction", "0.8",
                 "--uco-fraction", "0.5"])
    assert code == 2 and "at most all components" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory) -> Path:  # noqa: F811
    """One small citi run through the CLI, shared by the tests that use its adapter."""
    work = tmp_path_factory.mktemp("cli")
    data = write_data(work)
    out = work / "adapter"
    code = main(["finetune", "--model", tiny_model, "--data", data, "--out", str(out), "--max-steps", "3",
                 "--json-events", *SMALL])
    assert code == 0
    return out


def test_finetune_prints_events_and_writes_an_adapter_directory(adapter_dir, capsys):
    for name in ("adapter_config.json", "adapter_model.safetensors", "importance.json", "importance.png",
                 "citi_job.json", "README.md"):
        assert (adapter_dir / name).is_file(), name
    job = json.loads((adapter_dir / "citi_job.json").read_text())
    assert job["config"]["budget"]["max_steps"] == 3 and job["config"]["components"]["num_experts"] == 2


def test_chat_answers_with_the_adapter_and_with_the_base_model(adapter_dir, tiny_model, tmp_path, capsys):  # noqa: F811
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    assert main(["chat", "--adapter", str(adapter_dir), "--tools", str(tools), "--max-new-tokens", "6", "--json",
                 "What is the weather in Oslo?"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["completion_tokens"] >= 1 and reply["finish_reason"] in ("stop", "length", "tool_calls")
    assert main(["chat", "--model", tiny_model, "--max-new-tokens", "4", "Say hello."]) == 0
    assert capsys.readouterr().out.strip()  # the talkative tiny model always says something


def test_peft_from_pretrained_loads_the_adapter_like_load_adapter(adapter_dir, tiny_model):  # noqa: F811
    from peft import PeftModel

    import citi_engine.molora  # noqa: F401  (registers the MOLoRA peft method)
    from citi_engine.adapter import load_adapter
    from citi_engine.models import load_model

    base, tokenizer = load_model(tiny_model)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    reference, _ = load_adapter(adapter_dir)
    ids = tokenizer("What is the weather in Rome?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_export_merges_uco_and_drops_molora(adapter_dir, tiny_model, tmp_path, capsys):  # noqa: F811
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "plain"
    assert main(["export", "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    plain = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    assert plain.keys() == base.keys()  # no MOLoRA or peft wrapper left: a plain Llama
    job = json.loads((adapter_dir / "citi_job.json").read_text())
    trained = load_file(str(adapter_dir / "adapter_model.safetensors"))
    uco = {c + ".weight" for c in job["components"]["uco"]}
    for name in uco:  # the trained UCO weights replace the base weights...
        torch.testing.assert_close(plain[name].data, trained["base_model.model." + name])
        assert not torch.equal(plain[name].data, base[name].data)
    for name in plain.keys() - uco:  # ...and everything else is the base model, MOLoRA dropped
        assert torch.equal(plain[name].data, base[name].data), name
    assert "dropped" in (out / "README.md").read_text()


def test_export_refuses_a_non_empty_folder_unless_forced_and_force_replaces_it(adapter_dir, tmp_path,
                                                                                 capsys):
    out = tmp_path / "plain"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "--adapter", str(adapter_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # untouched
    assert main(["export", "--adapter", str(adapter_dir), "--out", str(adapter_dir), "--force"]) == 2
    assert (adapter_dir / "adapter_model.safetensors").is_file()

    assert main(["export", "--adapter", str(adapter_dir), "--out", str(out), "--force"]) == 0
    assert "replaced" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" not in names and {"config.json", "model.safetensors", "citi_export.json"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["plain"]  # no staging folder left beside it

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--adapter", str(adapter_dir), "--out", str(empty)]) == 0  # an empty folder is fine
    assert (empty / "model.safetensors").is_file()


def test_importance_command_writes_scores_and_heat_map(tiny_model, tmp_path, capsys):  # noqa: F811
    data = write_data(tmp_path)
    out = tmp_path / "imp"
    assert main(["importance", "--model", tiny_model, "--data", data, "--out", str(out), "--importance-examples",
                 "4", "--batch-size", "4", "--max-length", "192", "--quiet"]) == 0
    doc = json.loads((out / "importance.json").read_text())
    assert len(doc["components"]) == 14 and doc["molora"] and doc["uco"]
    assert (out / "importance.png").stat().st_size > 1000
    assert "MOLoRA (" in capsys.readouterr().out


def test_console_script_entry_point_runs_as_a_module(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "citi_engine.cli.main", "validate", write_data(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and ": ok: 22 examples" in out.stdout


def test_eval_reports_on_a_tool_test_file_and_decodes_as_a_job_does_by_default(adapter_dir, tmp_path, capsys):  # noqa: F811
    tool_test = Path(__file__).resolve().parents[2] / "examples" / "tools_test.jsonl"
    common = ["eval", "--adapter", str(adapter_dir), "--tool-test", str(tool_test), "--limit", "3",
              "--max-new-tokens", "12", "--no-retention", "--no-humaneval"]
    reports = {}
    for decode in (None, "static"):  # the default, auto, is the dynamic cache on CPU
        out = tmp_path / str(decode)
        assert main([*common, "--out", str(out), *(["--decode", decode] if decode else [])]) == 0
        reports[decode] = json.loads((out / "report.json").read_text())
    capsys.readouterr()
    assert reports[None]["tool"]["n"] == 3
    assert reports[None]["tool"] == reports["static"]["tool"]  # another loop, the same greedy replies and verdicts
    with pytest.raises(SystemExit):
        main([*common, "--decode", "turbo"])
    assert "invalid choice: 'turbo'" in capsys.readouterr().err
