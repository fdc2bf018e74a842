"""The repository's shape: the top level holds the model, the sheet and the commands; the library is the
`topolm` package; commands are leaves; the layering and the light modules stay as promised."""
import ast
import subprocess

from conftest import COMMANDS, PYTHON, REPO


def scripts() -> list:
    """Every command-line script: top-level files with a __main__ block, and the data preparers."""
    top = [p for p in REPO.glob("*.py") if "__main__" in p.read_text()]
    return sorted(top + list(REPO.glob("data/*/prepare.py")) + list(REPO.glob("init-data/*.py")))


def imported_modules(path) -> set:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_scripts_are_leaves():
    # every script's module name, also the preparers' `prepare` (reachable once a folder is put on sys.path)
    names = {p.stem for p in scripts()}
    assert {"train", "finetune", "sample", "init_pos", "bench", "glue_summary", "prepare"} <= names
    offenders = []
    for path in [*REPO.glob("*.py"), *REPO.glob("data/*/*.py"), *REPO.glob("init-data/*.py")]:
        text = path.read_text()
        for module in imported_modules(path) & names - {path.stem}:
            offenders.append(f"{path.relative_to(REPO)} imports the script {module}")
        # loading another file as a module by path is the same dependency in disguise
        for marker in ("importlib", "spec_from_file_location", "runpy", "exec("):
            if marker in text:
                offenders.append(f"{path.relative_to(REPO)} uses {marker}")
    assert offenders == []


def test_a_script_is_caught_importing_a_script(tmp_path):
    # the check above must be able to fail: a file importing `train` is reported
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom train import TrainConfig\n")
    assert "train" in imported_modules(bad)


# The user's names, the model and the sheet, and the project's own files and folders.
TOP_LEVEL = {".ci", ".gitignore", "Makefile", "README.md", "pytest.ini", "requirements.txt", "requirements-dev.txt",
             "requirements-hf.txt", "brainscore", "config", "data", "docs", "finetuned", "gpt2-positions", "init-data", "out",
             "stimuli", "tests", "topolm", "model.py", "positions.py"} | {f"{c}.py" for c in COMMANDS}


def library_modules() -> list:
    return sorted((REPO / "topolm").glob("*.py"))


def test_the_top_level_holds_the_model_the_sheet_and_the_commands():
    assert {p.stem for p in REPO.glob("*.py")} == COMMANDS | {"model", "positions"}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert {line.split("/")[0] for line in tracked.splitlines()} <= TOP_LEVEL
    for name in COMMANDS:
        text = (REPO / f"{name}.py").read_text()
        assert "__main__" in text and "cli_main" in text, f"{name}.py is not a command"
    assert "__main__" not in (REPO / "model.py").read_text() + (REPO / "positions.py").read_text()


def test_no_library_module_imports_a_command():
    for path in library_modules():
        assert not imported_modules(path) & COMMANDS, path.name


def test_the_model_and_the_sheet_import_only_the_torch_free_config_of_the_package():
    for name in ("model.py", "positions.py"):
        tree = ast.parse((REPO / name).read_text())
        from_package = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "topolm":
                from_package.add(node.module)
            elif isinstance(node, ast.Import):
                from_package |= {a.name for a in node.names if a.name.split(".")[0] == "topolm"}
        assert from_package <= {"topolm.config"}, (name, from_package)
    assert "positions" in imported_modules(REPO / "model.py")
    assert "model" not in imported_modules(REPO / "positions.py")


def test_nothing_imports_the_stimuli_folder_as_a_module():
    # `stimuli/` (the data) sits at the root, which is on sys.path: a bare `import stimuli` would find the folder
    for path in [*REPO.glob("*.py"), *library_modules(), *REPO.glob("tests/*.py"), *REPO.glob("*/*.py")]:
        assert "stimuli" not in imported_modules(path), path


def test_light_modules_do_not_import_torch():
    # config (keys, errors), distributed setup, files, the tokenizer and GLUE serve torch-free callers such as
    # glue_summary.py; torch is imported only when a process group is started
    code = ("import sys; sys.path.insert(0, %r); import topolm.config, topolm.distributed, topolm.files, "
            "topolm.tokenizer, topolm.glue, glue_summary; print('torch' in sys.modules)" % str(REPO))
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_no_test_module_imports_another():
    tests = {p.stem for p in (REPO / "tests").glob("test_*.py")}
    for path in (REPO / "tests").glob("*.py"):
        assert not (imported_modules(path) & tests), path.name


MAX_FUNCTION_LINES = 80


def function_faults(source: str, name: str = "<source>") -> list[str]:
    """Every function of `source` longer than MAX_FUNCTION_LINES lines (def to last line, decorators
    excluded), and every function that holds a nested function using `nonlocal` (a closure over the
    loop's state, which should be passed in explicitly)."""
    faults = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
            faults.append(f"{name}:{node.lineno} {node.name} has {length} lines")
        inner = [n for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                 and n is not node]
        if any(isinstance(x, ast.Nonlocal) for f in inner for x in ast.walk(f)):
            faults.append(f"{name}:{node.lineno} {node.name} holds a nested function using nonlocal")
    return faults


def test_no_long_function_and_no_closure_over_nonlocal_state():
    paths = [*REPO.glob("*.py"), *library_modules(), *REPO.glob("data/*/prepare.py"), REPO / "init-data" / "prepare.py"]
    assert {"train.py", "finetune.py", "training.py", "prepare.py"} <= {p.name for p in paths}
    faults = [f for path in sorted(paths) for f in function_faults(path.read_text(), str(path.relative_to(REPO)))]
    assert faults == []


def test_the_function_checker_finds_a_long_function_and_a_closure():
    long_body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))  # def line + 80 = 81 lines
    closure = ("def outer():\n    n = 0\n    def bump():\n        nonlocal n\n        n += 1\n"
               "    bump()\n    return n\n")
    fine = "def short():\n    def helper(y):\n        return y + 1\n    return helper(1)\n"
    assert function_faults(f"def long():\n{long_body}") == ["<source>:1 long has 81 lines"]
    assert function_faults(closure) == ["<source>:1 outer holds a nested function using nonlocal"]
    assert function_faults(fine) == []
    assert function_faults("def edge():\n" + "".join(f"    x{i} = {i}\n" for i in range(79))) == []


def test_peak_flops_match_the_most_specific_gpu_name():
    from topolm.training import peak_flops_for_name

    assert peak_flops_for_name("NVIDIA L40S") == 362e12
    assert peak_flops_for_name("NVIDIA L4") == 121e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H200") == 989e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA A10") == 125e12
    assert peak_flops_for_name("Some Future GPU") is None
