"""The repository's shape: scripts are leaves, library modules stay light where promised."""
import ast
import subprocess

from conftest import PYTHON, REPO


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


def test_light_modules_do_not_import_torch():
    # common.py (config, errors, files) and glue.py (GLUE metrics) serve torch-free callers such as glue_summary.py
    code = ("import sys; sys.path.insert(0, %r); import common, glue, glue_summary; "
            "print('torch' in sys.modules)" % str(REPO))
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_no_test_module_imports_another():
    tests = {p.stem for p in (REPO / "tests").glob("test_*.py")}
    for path in (REPO / "tests").glob("*.py"):
        assert not (imported_modules(path) & tests), path.name


def test_peak_flops_match_the_most_specific_gpu_name():
    from training import peak_flops_for_name

    assert peak_flops_for_name("NVIDIA L40S") == 362e12
    assert peak_flops_for_name("NVIDIA L4") == 121e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H200") == 989e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA A10") == 125e12
    assert peak_flops_for_name("Some Future GPU") is None
