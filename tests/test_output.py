"""What a CI log sees: `build` and `publish --json --quiet` with stderr going to a file print no
third-party progress bar or warning (torch's deprecation notices, huggingface_hub's upload bars);
`--verbose` lets them through, which shows this test can fail."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import run_subprocess

pytestmark = pytest.mark.real_model

NOISE = re.compile(r"it/s\]|B/s\]|\d+%\||[Ww]arning|_pytree|register_constant")


def test_build_and_publish_keep_library_noise_off_stderr(demo_release, tmp_path):
    # The session's demo release was built as CI builds it: `build --jobs 2 --json --quiet` in a
    # child process, stderr captured (every step's own stderr goes to its log, not here).
    assert demo_release.out["ok"]
    assert not NOISE.search(demo_release.stderr), demo_release.stderr[:2000]
    release = demo_release.out["release_dir"]
    hub = tmp_path / "hub"
    p = run_subprocess("publish", release, "--endpoint", f"local:{hub}", "--json", "--quiet")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert json.loads(p.stdout) and not NOISE.search(p.stderr), p.stderr[:2000]
    assert p.stderr.strip() == ""
    # The same publish with --verbose (to a new Hub, so there is something to upload) shows the
    # library's upload bars: the pattern above does catch them when they are there.
    v = run_subprocess("--verbose", "publish", release, "--endpoint", f"local:{tmp_path / 'hub2'}", "--json")
    assert v.returncode == 0 and NOISE.search(v.stderr), v.stderr[:2000]


def _commands(group, path=()):
    """Every command of the click tree typer builds, with its path of names."""
    import click

    for name, cmd in getattr(group, "commands", {}).items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


@pytest.mark.parametrize("markup", ["<name>-<version>", "<step>"])
def test_help_keeps_angle_bracketed_names(markup):
    """rich's markdown mode eats ``<name>`` as an HTML tag: `build --help` printed ``DIST/-/``."""
    from typer.testing import CliRunner

    from release.cli import app

    r = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "300"})
    assert r.exit_code == 0 and markup in r.stdout, r.stdout


def test_every_command_help_shows_every_word_of_its_text():
    """Each word of every command's docstring and option help appears in its rendered ``--help``
    (markdown must not swallow placeholders, underscores or asterisks)."""
    import typer.main
    from typer.testing import CliRunner

    from release.cli import app

    group = typer.main.get_command(app)
    checked = 0
    for path, cmd in _commands(group):
        r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400"})
        assert r.exit_code == 0, (path, r.stdout)
        shown = set(re.sub(r"[│╭╮╰╯─]", " ", r.stdout).replace("`", "").split())
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for text in texts:
            for word in text.replace("`", "").replace("**", "").split():
                # rich may wrap a sentence's last punctuation onto the word: compare the stripped word
                core = word.strip(".,;:()")
                if not core:
                    continue
                assert any(core in w for w in shown), f"{' '.join(path)} --help lost {word!r}"
                checked += 1
    assert checked > 500  # every command was read
