"""`models`: the first version's list of names, and the mapping name -> {revision, vocab_size}."""

import pytest

from proxy.settings import SettingsError, load_settings


def test_list_and_comma_string_are_names_without_facts() -> None:
    for models in (["a", "b"], "a, b"):
        s = load_settings({"upstream": "http://u", "models": models}, environ={})
        assert list(s.models) == ["a", "b"] and "a" in s.models
        assert s.revision_for("a") is None and s.vocab_size_for("a") == s.vocab_size


def test_mapping_gives_each_model_its_revision_and_vocabulary() -> None:
    s = load_settings({"upstream": "http://u", "vocab_size": 1000,
                       "models": {"a": {"revision": "r1", "vocab_size": 49152}, "b": None}}, environ={})
    assert s.revision_for("a") == "r1" and s.vocab_size_for("a") == 49152
    assert s.revision_for("b") is None and s.vocab_size_for("b") == 1000
    assert s.vocab_size_for("not-configured") == 1000


def test_nested_environment_keys_reach_one_model() -> None:
    s = load_settings({"upstream": "http://u"}, environ={"ENTROPY_PROXY_MODELS__A__VOCAB_SIZE": "262208"})
    assert s.vocab_size_for("a") == 262208


@pytest.mark.parametrize("bad", [{"a": {"vocab": 3}}, {"a": {"vocab_size": 1}}, [1, 2]])
def test_bad_model_entries_name_the_key(bad: object) -> None:
    with pytest.raises(SettingsError, match="^models"):
        load_settings({"upstream": "http://u", "models": bad}, environ={})
