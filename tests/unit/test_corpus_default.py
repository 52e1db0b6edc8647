"""With no corpus set, kdrun streams a hub corpus when the hub answers, and offline says how to set one."""

from __future__ import annotations

import logging

import pytest

import kdrun.data.corpus as corpus_module
from kdrun.data.corpus import DEFAULT_HUB_CORPUS, CorpusNotFound, check_corpus, default_corpus, hub_reachable
from composing import compose_config




def test_a_set_corpus_is_kept_and_the_hub_is_not_asked() -> None:
    def never() -> bool:
        raise AssertionError("the hub must not be asked when a corpus is set")

    assert default_corpus("/data/text.txt", never) == "/data/text.txt"


def test_unset_corpus_is_the_hub_default_only_when_reachable() -> None:
    assert default_corpus(None, lambda: True) == DEFAULT_HUB_CORPUS
    assert default_corpus(None, lambda: False) is None


def test_offline_mode_means_unreachable_without_a_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("no request in offline mode")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    assert hub_reachable() is False


def test_missing_corpus_error_says_how_to_set_one_and_names_no_workspace_path() -> None:
    with pytest.raises(CorpusNotFound) as error:
        check_corpus(None)
    message = str(error.value)
    assert "data.corpus=" in message and "KDRUN_CORPUS" in message and DEFAULT_HUB_CORPUS in message
    assert "shared" not in message and "../" not in message


@pytest.mark.parametrize(("reachable", "expected"), [(True, DEFAULT_HUB_CORPUS), (False, None)])
def test_cli_sets_the_default_before_planning(monkeypatch: pytest.MonkeyPatch, caplog, reachable, expected) -> None:
    from kdrun.cli import _default_corpus

    monkeypatch.delenv("KDRUN_CORPUS", raising=False)
    monkeypatch.setattr(corpus_module, "hub_reachable", lambda timeout=5.0: reachable)
    cfg = compose_config("experiment=tinybert_sst2")
    assert cfg.data.corpus is None
    with caplog.at_level(logging.INFO, logger="kdrun"):
        _default_corpus(cfg)
    assert cfg.data.corpus == expected
    assert (DEFAULT_HUB_CORPUS in caplog.text) is reachable


def test_cli_leaves_runs_without_a_corpus_stage_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdrun.cli import _default_corpus

    monkeypatch.delenv("KDRUN_CORPUS", raising=False)
    monkeypatch.setattr(corpus_module, "hub_reachable", lambda timeout=5.0: True)
    cfg = compose_config("experiment=teacher_sst2")
    _default_corpus(cfg)
    assert cfg.data.corpus is None
