"""Optional packages: each feature names the extra that installs its package, in one line."""
import re
import sys
from pathlib import Path

import pytest

from gunn_ext.extras import DISTRIBUTIONS, MissingExtra, require
from gunn_ext.train.cli import main as train_main

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_CALL = re.compile(r'require\(\s*"([\w.]+)",\s*"(\w+)"')


def hide(monkeypatch, package: str) -> None:
    """Make ``package`` and its submodules unimportable, as if not installed (even if imported before)."""
    for name in [n for n in sys.modules if n.startswith(package + ".")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_every_required_package_comes_with_the_extra_its_message_names():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: {requirement_name(r) for r in reqs}
              for name, reqs in project["optional-dependencies"].items()}
    sources = list((ROOT / "gunn_ext").rglob("*.py")) + list((ROOT / "benchmarks").glob("*.py"))
    calls = {(module.split(".")[0], extra) for path in sources
             for module, extra in REQUIRE_CALL.findall(path.read_text())}
    assert {("sklearn", "train"), ("PIL", "train"), ("matplotlib", "train"),
            ("matplotlib", "bench")} <= calls
    for module, extra in calls:
        assert DISTRIBUTIONS[module] in extras.get(extra, set()), (module, extra)
    assert DISTRIBUTIONS["triton"] in extras["triton"]
    assert {"rich", "tqdm"} <= {requirement_name(r) for r in project["dependencies"]}


def test_a_missing_package_is_one_line_naming_feature_package_and_extra(monkeypatch):
    hide(monkeypatch, "sklearn")
    with pytest.raises(MissingExtra) as info:
        require("sklearn.datasets", "train", "--dataset digits")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("--dataset digits needs scikit-learn")
    assert '".[train]"' in message
    with pytest.raises(ValueError, match="optional packages"):
        require("numpy", "train", "anything")


@pytest.mark.parametrize("missing, options", [("sklearn", []), ("matplotlib", ["--plot"])])
def test_training_cli_stops_with_one_line_when_an_extra_is_missing(missing, options, monkeypatch,
                                                                   tmp_path, capsys):
    hide(monkeypatch, missing)
    status = train_main(["--width", "0.1", "--epochs", "1", "--out", str(tmp_path / "run"),
                         "--backend", "reference", *options])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and '".[train]"' in err and DISTRIBUTIONS[missing] in err
    assert not (tmp_path / "run").exists()
