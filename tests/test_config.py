import pytest

from flexigpt.config import Params, check_float, check_int, flatten
from flexigpt.errors import FlexiError


@pytest.mark.parametrize("bad", ["12", "ten", -1, 1.5, True, None, [3]])
def test_check_int_rejects_non_counts(bad):
    with pytest.raises(FlexiError) as e:
        check_int("calibration.n_sequences", bad, min=0)
    assert e.value.param == "calibration.n_sequences"


def test_check_int_accepts_whole_floats_and_bounds():
    assert check_int("k", 4.0, min=1) == 4
    with pytest.raises(FlexiError, match="at most 3"):
        check_int("k", 4, max=3)
    assert check_int("k", None, allow_none=True) is None


def test_check_float_exclusive_min_and_nan():
    with pytest.raises(FlexiError, match="> 0"):
        check_float("train.lr", 0.0, min=0.0, min_exclusive=True)
    with pytest.raises(FlexiError, match="finite"):
        check_float("train.lr", float("nan"))


def test_params_missing_key_and_choices(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("model:\n  dtype: float64\n")
    p = Params.load(f)
    with pytest.raises(FlexiError, match="model.source"):
        p.get("model.source")
    with pytest.raises(FlexiError, match="float32"):
        p.str("model.dtype", choices=["float32", "bfloat16"])


def test_params_bad_yaml(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(FlexiError, match="valid YAML"):
        Params.load(f)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
