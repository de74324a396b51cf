"""mkdocs hook: the command-line reference page, generated from the Typer app at build time.

``docs/reference/cli.md`` holds the marker below; this hook replaces it with what Typer's own
``typer prefect_distrain.cli utils docs`` prints, run with the interpreter that runs mkdocs (no
``typer`` looked up on PATH) and failing the build loudly if it fails. Plugins were tried
first: mkdocs-typer (through mkdocs-click) and mkdocs-typer2's in-process engine expect
``click.Command`` objects, which the Typer installed here (0.29) no longer builds (it vendors
click as ``typer._click``); mkdocs-typer2's other engine shells out to ``typer`` on PATH and
renders an empty page when that fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from mkdocs.exceptions import PluginError

MARKER = "<!-- prefect-distrain CLI reference -->"
PAGE = "reference/cli.md"


def _cli_markdown(cwd: str) -> str:
    command = [sys.executable, "-m", "typer", "prefect_distrain.cli", "utils", "docs",
               "--name", "prefect-distrain"]
    env = dict(os.environ, COLUMNS="100", NO_COLOR="1", TERM="dumb")
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise PluginError(f"{' '.join(command[1:])} failed (exit {done.returncode}):\n"
                          f"{done.stderr.strip()}")
    # The page has its own title: every generated heading goes one level down.
    return re.sub(r"^(#{1,5}) ", r"#\1 ", done.stdout, flags=re.MULTILINE)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE} lost its marker {MARKER!r}")
    return markdown.replace(MARKER, _cli_markdown(os.path.dirname(config.config_file_path)))
