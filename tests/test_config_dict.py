"""bmclip.config_dict.update_from_dict: the one nested-dict update of config dataclasses."""

from dataclasses import dataclass, field

import pytest
import yaml

from bmclip.config_dict import update_from_dict
from bmclip.errors import ConfigError


@dataclass
class Inner:
    n: int = 1
    rate: float | None = None
    names: list[str] = field(default_factory=list)
    path: str = ""  # "" = unset


@dataclass
class Outer:
    flag: bool = False
    name: str = "a"
    inner: Inner = field(default_factory=Inner)


def test_strings_are_parsed_to_the_annotated_types():
    o = update_from_dict(Outer(), {"flag": "yes", "inner.n": "3", "inner": {"rate": "1e-4", "names": "[x, y]"}})
    assert o == Outer(flag=True, inner=Inner(n=3, rate=1e-4, names=["x", "y"]))
    assert update_from_dict(Outer(), {"inner": {"rate": "none"}}).inner.rate is None


def test_a_section_can_be_given_as_its_dataclass_and_is_copied():
    given = Inner(n=7)
    o = update_from_dict(Outer(), {"inner": given})
    assert o.inner == given and o.inner is not given


@pytest.mark.parametrize("values, match", [
    ({"nope": 1}, r"unknown config key 'nope'; valid keys here: \['flag', 'inner', 'name'\]"),
    ({"inner.nope": 1}, "unknown config key 'inner.nope'"),
    ({"inner": 3}, "inner: is a section"),
    ({"name.x": 1}, "'name' is not a section"),
    ({"inner.n": "2.5"}, "inner.n: expected an integer"),
    ({"flag": "maybe"}, "flag: expected true/false"),
])
def test_bad_keys_and_values_are_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        update_from_dict(Outer(), values)


def test_programmatic_values_refuse_strings_for_non_string_fields():
    with pytest.raises(ConfigError, match=r"flag='yes': expected a bool, not a string"):
        update_from_dict(Outer(), {"flag": "yes"}, parse_strings=False)
    with pytest.raises(ConfigError, match="inner.rate='1'"):
        update_from_dict(Outer(), {"inner": {"rate": "1"}}, parse_strings=False)
    o = update_from_dict(Outer(), {"name": "b", "inner": {"n": 2, "rate": 3}}, parse_strings=False)
    assert o == Outer(name="b", inner=Inner(n=2, rate=3.0))


def test_null_for_a_string_field_is_its_unset_value_or_an_error_never_the_string_none():
    """YAML `val:` (empty), `~` and `null` load as None; they used to become the string "None" (a shard, a cache
    folder or an out_dir named None)."""
    given = yaml.safe_load("inner:\n  path:\n  rate: ~\n")
    o = update_from_dict(Outer(inner=Inner(path="/set/before")), given)
    assert o.inner.path == "" and o.inner.rate is None  # the field's default "": unset
    assert update_from_dict(Outer(), {"inner.path": None}, parse_strings=False).inner.path == ""
    with pytest.raises(ConfigError, match=r"^name: must not be null .*leave the key out to keep 'b'"):
        update_from_dict(Outer(name="b"), yaml.safe_load("name: null\n"))
    with pytest.raises(ConfigError, match=r"inner\.names\[1\]: expected a string, got None"):
        update_from_dict(Outer(), yaml.safe_load("inner: {names: [a, ~]}\n"))
    assert update_from_dict(Outer(), {"name": "None"}).name == "None"  # a string stays what it says
