from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from thunderline_lab.compare import compare_study
from thunderline_lab.errors import ConfigError
from thunderline_lab.lab import ENV_LAB_HOME, Lab, study_name
from thunderline_lab.monitor import synthetic_study


def test_resolve_takes_the_path_then_the_variable_then_lab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_LAB_HOME, raising=False)
    assert Lab.resolve().root == tmp_path / "lab"
    monkeypatch.setenv(ENV_LAB_HOME, str(tmp_path / "home"))
    assert Lab.resolve().root == tmp_path / "home"
    assert Lab.resolve(tmp_path / "given").root == tmp_path / "given"


def test_a_lab_db_given_as_the_lab_is_told_to_give_its_folder(tmp_path: Path) -> None:
    # compare_study(".../lab/lab.db") said "no trial store at .../lab.db/lab.db"
    lab = Lab.resolve(tmp_path / "lab")
    with lab.store() as store:
        store.append(synthetic_study("s", n_pairs=2, epochs=1))
    with pytest.raises(ConfigError, match=r"a file, not a lab folder \(give the folder that"):
        compare_study(lab.db_path, "s")
    assert compare_study(lab.root, "s", details=False).study == "s"


def test_the_variable_set_to_a_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv(ENV_LAB_HOME, str(afile))
    with pytest.raises(ConfigError, match=rf"^\$THUNDERLINE_LAB_HOME {afile}: a file"):
        Lab.resolve()


@pytest.mark.parametrize("path", [5, 2.5, ["lab"]])
def test_a_path_that_is_no_path_is_refused(path: object) -> None:
    # papermill makes -p lab_dir 5 the int 5: it was a TypeError from pathlib
    with pytest.raises(ConfigError, match=r"^lab directory: a folder path, not "):
        Lab.resolve(path)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "name"), [(2024, "2024"), (np.int64(7), "7"), ("a b", "a b")])
def test_study_name_takes_text_and_integers_as_their_text(value: Any, name: str) -> None:
    assert study_name(value) == name


@pytest.mark.parametrize("value", [2.5, True, None, ["a"], "", "  "])
def test_study_name_refuses_anything_else_naming_the_argument(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"^studies: expected a study name \(text; an integer"):
        study_name(value, "studies")
