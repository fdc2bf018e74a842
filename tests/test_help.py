"""`python X.py help` (also `--help`, `-h`): every key of every command with its type, choices, default and
docstring, printed before anything is loaded, exit status 0. And the docs that rely on it: every command line in
the README and docs/ is accepted by its command's config, every docs/ link resolves, the README's file tree
names every file it should."""
import ast
import dataclasses
import importlib
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest
import torch

from conftest import COMMANDS, PYTHON, REPO, run_script
from topolm.config import config_help, key_help


def load_config_call(name: str) -> ast.Call:
    tree = ast.parse((REPO / f"{name}.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "load_config"]
    assert len(calls) == 1, f"{name}.py should call load_config once"
    return calls[0]


def config_class(name: str) -> type:
    """The class a command's main passes to load_config, found in its source (so a command without one fails)."""
    return getattr(importlib.import_module(name), load_config_call(name).args[0].id)


def default_preset(name: str) -> str | None:
    return next((k.value.value for k in load_config_call(name).keywords if k.arg == "default_file"), None)


def docstring_by_regex(cls: type, field: str) -> str:
    """A second reader of field docstrings, independent of the one under test: the triple-quoted string on the
    lines after `field: type = default` in the nearest class of the MRO whose source declares it."""
    import inspect
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        match = re.search(rf'^    {field}: [^\n]*\n    """(.*?)"""', inspect.getsource(klass), re.S | re.M)
        if match:
            return " ".join(match.group(1).split())
    return ""


def literal_choices(annotation: str) -> list[str]:
    match = re.fullmatch(r"Literal\[(.*)\]", annotation)
    return [str(v) for v in ast.literal_eval(f"[{match.group(1)}]")] if match else []


@pytest.fixture
def nothing_loads(monkeypatch):
    """Reading a checkpoint or a token file during help is a failure."""
    def boom(*args, **kwargs):
        raise AssertionError("help read a checkpoint or data file")
    for owner, attr in ((torch, "load"), (np, "memmap"), (np, "fromfile"), (np, "load")):
        monkeypatch.setattr(owner, attr, boom)


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize("word", ["help", "--help", "-h"])
def test_help_lists_every_key_and_loads_nothing(name, word, capsys, nothing_loads):
    cls = config_class(name)
    module = importlib.import_module(name)
    # arguments that would load a real checkpoint and data if anything ran before help
    argv = ["ckpt=tests/fixtures/v1/train-ckpt-0000002.pt", "dataset=shakespeare", word]
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python {name}.py ")
    lines = out.splitlines()
    flat = " ".join(out.split())
    for f in dataclasses.fields(cls):
        [line] = [x for x in lines if x.startswith(f"  {f.name} (")]
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # a list key: its factory's
        default = repr(value) if isinstance(value, str) else str(value)
        assert f" = {default}" in line, (f.name, line)
        doc = docstring_by_regex(cls, f.name)
        assert doc, f"{cls.__name__}.{f.name} has no docstring"
        assert doc in flat, (f.name, doc)
        choices = literal_choices(str(f.type))
        if choices:
            assert f"one of {', '.join(choices)})" in line, (f.name, line)


def test_choices_and_preset_values_shown(capsys):
    import finetune
    import train
    with pytest.raises(SystemExit):
        train.main(["train_gpt2.yaml", "help"])
    out = capsys.readouterr().out
    assert "preset: config/train_gpt2.yaml" in out
    assert "  n_embed (int) = 784  [preset: 784]" in out
    assert "  backend (str, one of auto, nccl, gloo) = 'auto'" in out
    assert "  learning_rate (float) = 0.0006  [preset: 0.0006]" in out  # 6e-4 in the YAML, a float as loaded
    with pytest.raises(SystemExit):
        finetune.main(["help"])
    out = capsys.readouterr().out
    assert "one of cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli)" in out
    # finetune.py redeclares batch_size with its own default: listed once, under its own class, its docstring
    assert out.count("  batch_size (") == 1
    own = out.split("\n\n")[1]
    assert own.startswith("FinetuneConfig (finetune.py)") and "  batch_size (int) = 64" in own
    assert "Examples per micro-batch and rank (the paper: 64)." in own


def test_help_with_a_missing_preset_still_helps(capsys):
    import sample
    with pytest.raises(SystemExit) as stop:
        sample.main(["no_such_preset.yaml", "-h"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "preset: no_such_preset.yaml (not readable)" in out and "  ckpt (str) = " in out


@dataclass
class _Base:
    """A base config."""
    a: int = 1
    """The key a."""
    b: Literal["x", "y"] = "x"
    shape: tuple = dataclasses.field(default_factory=lambda: (2, 3))
    """Made by a factory."""


@dataclass
class _Derived(_Base):
    """A derived config."""
    a: int = 2
    c: str = ""
    """The key c,
    on two lines."""


@dataclass
class _Bare:
    x: float = 0.5
    """The key x."""


def test_key_help_follows_the_bases_and_redeclarations():
    keys = {k.name: k for k in key_help(_Derived)}
    assert list(keys) == ["a", "b", "shape", "c"]
    assert (keys["a"].owner, keys["a"].default, keys["a"].doc) == (_Derived, 2, "The key a.")  # base's docstring
    assert (keys["b"].owner, keys["b"].type, keys["b"].choices, keys["b"].doc) == (_Base, "str", ("x", "y"), "")
    assert keys["shape"].default == (2, 3) and keys["c"].doc == "The key c, on two lines."
    text = config_help(_Derived, [])
    assert text.index("_Derived (") < text.index("_Base (")
    assert "  b (str, one of x, y) = 'x'" in text and "  c (str) = ''" in text
    # a class without a docstring: its header is its name and file, not the signature dataclass puts in __doc__
    assert config_help(_Bare, []).splitlines()[4:7] == ["_Bare (tests/test_help.py)", "  x (float) = 0.5",
                                                        "      The key x."]


def test_help_is_a_real_exit_status_0_and_imports_no_torch():
    # glue_summary.py needs no torch; help must not bring it in (python -X importtime lists every import)
    proc = run_script([PYTHON, "-X", "importtime", "glue_summary.py", "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python glue_summary.py ")
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "topolm.config" in imported and "topolm.glue" in imported  # the listing is there
    assert "torch" not in imported


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a command as the docs show it: after `python`, after torchrun and its flags, or at the start of inline code
COMMAND_LINE = re.compile(r"(?:\bpython |\btorchrun [^\n`|#]*?|`)(?:[\w./-]*/)?(" + "|".join(sorted(COMMANDS))
                          + r")\.py\b([^\n`|#]*)")


def documented_command_lines() -> list[tuple[str, str, list[str]]]:
    import shlex
    lines = []
    for path in DOCS:
        text = path.read_text().replace("\\\n", " ")  # a command continued on the next line
        for match in COMMAND_LINE.finditer(text):
            args = [a for a in shlex.split(match.group(2).split("&&")[0]) if not a.startswith("-")]
            lines.append((path.name, match.group(1), args))
    return lines


def test_the_docs_show_command_lines():
    # the parser below must find the commands it checks: every command appears with its keys somewhere
    found = {name for _, name, args in documented_command_lines() if any("=" in a for a in args)}
    assert found == COMMANDS, COMMANDS - found


def test_every_command_line_in_the_docs_is_accepted_by_its_config():
    from topolm.config import UserError, load_config
    refused = []
    for doc, name, args in documented_command_lines():
        if not args or set(args) & {"help", "--help", "-h"}:  # a command named in prose, or its help
            continue
        # a value from a shell variable (a loop's, an array task's) is known only there: its key must exist
        keys = {f.name for f in dataclasses.fields(config_class(name))}
        refused += [f"{doc}: {name}.py: no key {a.split('=')[0]!r} ({a})" for a in args
                    if "$" in a and "=" in a and "$" not in a.split("=")[0] and a.split("=")[0] not in keys]
        args = [a for a in args if "$" not in a]
        try:
            load_config(config_class(name), args, default_file=default_preset(name))
        except UserError as e:
            refused.append(f"{doc}: {name}.py {' '.join(args)}: {e}")
    assert refused == [], "\n".join(refused)


def test_every_link_to_a_file_in_the_docs_resolves():
    missing = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                missing.append(f"{path.name}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in github_anchors(resolved.read_text()):
                missing.append(f"{path.name}: {target} (no such heading)")
    assert missing == []


def github_anchors(markdown: str) -> set[str]:
    """The ids GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_the_readme_tree_names_every_command_module_and_preset_with_a_comment():
    readme = (REPO / "README.md").read_text()
    tree = readme[readme.index("\n.\n├──"):]
    tree = tree[:tree.index("```")]
    commented = {m.group(1) for m in re.finditer(r"── (\S+?)/?\s+# \S", tree)}
    wanted = ({f"{c}.py" for c in COMMANDS} | {"model.py", "positions.py", "Makefile", "topolm"}
              | {p.name for p in (REPO / "topolm").glob("*.py")} | {p.name for p in (REPO / "config").glob("*.yaml")}
              | {f"{p.parent.name}/prepare.py" for p in (REPO / "data").glob("*/prepare.py")})
    assert wanted <= commented, sorted(wanted - commented)
