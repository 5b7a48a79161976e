"""`python ppo_breakout.py export`: a checkpoint's policy in a file of its own, and the shipped one,
models/breakout_10m.pt."""

import torch
from conftest import ROOT, files_of_at_most, run_main, run_python

import cli
from evaluate import SHIPPED_AGENT
from run_files import POLICY_FORMAT

POLICY_KEYS = {
    "policy_format",
    "model",
    "n_actions",
    "configs",
    "update",
    "env_steps",
    "episode_rewards",
    "from_checkpoint",
}


def run(*args, cwd=ROOT, preexec_fn=None):
    return run_python(cwd, str(ROOT / "ppo_breakout.py"), *args, timeout=300, preexec_fn=preexec_fn)


def game_lines(out: str) -> list:
    return [line for line in out.splitlines() if line.startswith("game ")]


def test_export_keeps_the_weights_and_settings_only_and_evaluate_plays_it_as_the_checkpoint(short_run, tmp_path):
    out = tmp_path / "policy.pt"
    result = run("export", str(short_run), str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = torch.load(short_run / "checkpoints" / "update_0000004.pt", weights_only=True)
    policy = torch.load(out, weights_only=True)  # plain types and tensors, as a checkpoint
    assert set(policy) == POLICY_KEYS and policy["policy_format"] == POLICY_FORMAT
    assert "optimizer" not in policy and "ranks" not in policy and "format" not in policy
    assert policy["model"].keys() == checkpoint["model"].keys()
    assert all(torch.equal(policy["model"][k], checkpoint["model"][k]) for k in checkpoint["model"])
    assert all(t.dtype == torch.float32 for t in policy["model"].values())
    for key in ("n_actions", "configs", "update", "env_steps", "episode_rewards"):
        assert policy[key] == checkpoint[key], key
    assert policy["from_checkpoint"] == f"{short_run.name}/checkpoints/update_0000004.pt"
    assert out.stat().st_size < (short_run / "checkpoints" / "update_0000004.pt").stat().st_size
    assert result.stdout.startswith(f"wrote {out} (") and "update 4, 128 env steps" in result.stdout
    # the policy plays the checkpoint's games, action for action
    played = run("evaluate", str(out), "--episodes", "2", "--seed", "3")
    expected = run("evaluate", str(short_run), "--episodes", "2", "--seed", "3")
    assert played.returncode == expected.returncode == 0, played.stderr[-2000:]
    assert len(game_lines(played.stdout)) == 2 and game_lines(played.stdout) == game_lines(expected.stdout)
    assert f"checkpoint: {out} (update 4, 128 env steps)" in played.stdout


def test_a_checkpoint_exported_by_a_relative_path_from_inside_its_checkpoints_folder_names_its_run(
    short_run, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "policy.pt"
    monkeypatch.chdir(short_run / "checkpoints")
    assert run_main(cli.main, "export", "update_0000002.pt", str(out)) == 0, capsys.readouterr().err
    policy = torch.load(out, weights_only=True)
    assert policy["update"] == 2 and policy["from_checkpoint"] == f"{short_run.name}/checkpoints/update_0000002.pt"


def test_a_policy_is_not_resumed_nor_exported_again(short_run, tmp_path):
    out = tmp_path / "policy.pt"
    assert run("export", str(short_run), str(out)).returncode == 0
    for args, problem in [
        (["--resume", str(out)], f"ppo_breakout.py: error: argument --resume: {out} is an exported policy"),
        (["export", str(out), str(tmp_path / "again.pt")], f"ppo_breakout.py export: error: {out} is a policy already"),
    ]:
        result = run(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(problem), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.pt"], "no training started, nothing written"


def test_export_makes_the_folder_it_writes_into(short_run, tmp_path):
    result = run("export", str(short_run), str(tmp_path / "new" / "folder" / "policy.pt"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(tmp_path / "new" / "folder" / "policy.pt", weights_only=True)["update"] == 4


def test_bad_input_is_one_line_and_a_file_that_cannot_be_written_leaves_nothing(short_run, tmp_path):
    (tmp_path / "a_file").write_text("in the way of a folder")
    for args, code, problem in [
        ([str(short_run), str(tmp_path / "policy.zip")], 2, "argument out: "),
        ([str(short_run), str(tmp_path / "a_file" / "policy.pt")], 2, "argument out: cannot make folder "),
        ([str(tmp_path / "missing.pt"), str(tmp_path / "policy.pt")], 2, "checkpoint not found: "),
        ([str(tmp_path), str(tmp_path / "policy.pt")], 2, "no checkpoint in "),
    ]:
        result = run("export", *args, cwd=tmp_path)
        assert result.returncode == code, result.stderr[-2000:]
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"ppo_breakout.py export: error: {problem}"), line
    # as on a full disk: files of at most 1 MiB
    full = run("export", str(short_run), str(tmp_path / "policy.pt"), cwd=tmp_path, preexec_fn=files_of_at_most(2**20))
    assert full.returncode == 1
    expected = f"ppo_breakout.py export: error: cannot write {tmp_path / 'policy.pt'}: File too large"
    assert full.stderr.strip() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_the_shipped_agent_is_the_10m_run_s_policy_and_the_readme_states_its_training_score():
    policy = torch.load(ROOT / SHIPPED_AGENT, weights_only=True)
    assert set(policy) == POLICY_KEYS and "format" not in policy
    assert policy["configs"]["game"] == "breakout" and policy["configs"]["seed"] == 1
    assert policy["update"] == 10_000 and policy["env_steps"] == 10_240_000
    assert (ROOT / SHIPPED_AGENT).stat().st_size < 10 * 2**20, "a few MB, in the repository"
    scores = policy["episode_rewards"]
    assert len(scores) == 100
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| this project"))
    assert row.split("|")[2].strip() == "10,240,000", row
    assert f"{sum(scores) / 100:.2f}" in row.split("|")[3], row
