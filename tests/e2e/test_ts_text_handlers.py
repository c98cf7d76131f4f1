"""TorchServe's text handlers as tsctl implements them (text cleanup, vocabularies, the text
classifier), in this process through the `ts` fixture (tests/e2e/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tests.support.torchserve import venv_from_environment
from tests.support.ts_handlers import TS_MODELS, bare, close, handle, initialized
from tsctl.worker.envelope import EnvelopeInputError


def test_text_cleanup_steps(ts: Any) -> None:
    handler = bare(ts.text_classifier.TextClassifier)
    text = "<p>I don't LIKE caf\u00e9 &amp; they'd've said it's Bob's, y'all!</p>"
    assert handler.clean(text) == [
        "i", "do", "not", "like", "cafe", "they", "would", "have", "said", "it", "is", "bobs",
        "you", "all",
    ]  # fmt: skip
    assert handler._expand_contractions("Won't you? I'm sure we'll") == (
        "Will not you? I am sure we will"
    )
    assert list(ts.text.ngrams_iterator(["a", "b", "c"], 2)) == ["a", "b", "c", "a b", "b c"]
    assert ts.text.basic_english("Hello, World! (it's)") == [
        "hello", ",", "world", "!", "(", "it", "'", "s", ")",
    ]  # fmt: skip


def test_contractions_expand_as_torchserve_does(ts: Any) -> None:
    handler = bare(ts.text_classifier.TextClassifier)
    expected = {
        "how'd": "how did",
        "where'd": "where did",
        "so's": "so as",
        "why's": "why is",
        "can't": "cannot",
        "i'm": "i am",
        "it'd": "it would",
        "who's": "who is",
        "let's": "let us",
        "o'clock": "of the clock",
        "they'd've": "they would have",
        "y'all'd've": "you all would have",
        # not in the table: the apostrophe goes, as in TorchServe
        "here's": "heres",
        "who'd": "whod",
        "bob's": "bobs",
    }
    for word, expansion in expected.items():
        assert handler._expand_contractions(word) == expansion, word
    assert handler.clean("How'd you know? So's to see, why's that") == [
        "how", "did", "you", "know", "so", "as", "to", "see", "why", "is", "that",
    ]  # fmt: skip


@pytest.mark.slow
def test_contractions_match_torchserves_own_expansions(ts: Any, tmp_path: Path) -> None:
    """Every contraction TorchServe 0.12's table lists, through TorchServe's own
    `_expand_contractions` (run in its venv) and through ours."""
    python = venv_from_environment() / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no TorchServe venv at {python.parent.parent}")
    script = (
        "import json\n"
        "from ts.torch_handler.contractions import CONTRACTION_MAP\n"
        "from ts.torch_handler.text_handler import TextHandler\n"
        "words = [w.lower() for w in CONTRACTION_MAP]\n"
        "print(json.dumps({w: TextHandler._expand_contractions(None, w) for w in words}))\n"
    )
    run = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(theirs) > 100
    handler = bare(ts.text_classifier.TextClassifier)
    # where TorchServe garbles its own table: it copies the contraction's first character
    # onto the expansion ("ain't" -> "as not"), and of a double contraction it expands the
    # first part only ("they'd've" -> "they wouldve")
    garbled = {"ain't": "is not", "'cause": "because"}
    for word, expansion in theirs.items():
        ours = handler._expand_contractions(word)
        if word in garbled:
            assert ours == garbled[word], word
        elif word.count("'") > 1 and word != "sha'n't":
            assert " " in ours and "'" not in ours, (word, ours)
        else:
            assert ours == expansion, word


def test_cleanup_honours_both_punctuation_hook_names(ts: Any) -> None:
    """TorchServe's own name is misspelt (`_remove_puncutation`); either override counts."""

    class Misspelt(ts.text_classifier.TextClassifier):
        def _remove_puncutation(self, text: str) -> str:
            return text.replace("!", " bang ")

    class Spelt(ts.text_classifier.TextClassifier):
        def _remove_punctuation(self, text: str) -> str:
            return text.replace("!", " bang ")

    for cls in (Misspelt, Spelt):
        assert bare(cls).clean("wow!") == ["wow", "bang"], cls.__name__
    assert bare(ts.text_classifier.TextClassifier).clean("wow!") == ["wow"]


def test_vocabulary_forms(ts: Any, tmp_path: Path) -> None:
    import torch

    tokens = ["<unk>", "good", "bad"]
    (tmp_path / "list.json").write_text(json.dumps(tokens))
    (tmp_path / "dict.json").write_text(json.dumps({"good": 4, "bad": 7}))
    torch.save({t: i for i, t in enumerate(tokens)}, tmp_path / "dict.pt")
    torch.save(tokens, tmp_path / "list.pt")
    for name in ("list.json", "dict.pt", "list.pt"):
        vocab = ts.text.load_vocab(str(tmp_path / name))
        assert vocab["bad"] == 2 and vocab["unseen"] == 0 and len(vocab) == 3
    strict = ts.text.load_vocab(str(tmp_path / "dict.json"))
    assert strict["bad"] == 7 and strict.get("unseen") is None
    with pytest.raises(KeyError, match="has no <unk>"):
        strict["unseen"]
    (tmp_path / "bad.json").write_text(json.dumps({"good": "x"}))
    with pytest.raises(ValueError, match=r"bad\.json holds a dict, not a vocabulary"):
        ts.text.load_vocab(str(tmp_path / "bad.json"))


def test_a_torchtext_vocabulary_is_refused_clearly(
    ts: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TorchServe's archives pickle a torchtext Vocab; without torchtext it cannot load."""
    import torch

    vocab_module = types.ModuleType("torchtext.vocab")
    vocab_class = type("Vocab", (), {"__module__": "torchtext.vocab"})
    vocab_module.Vocab = vocab_class  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchtext", types.ModuleType("torchtext"))
    monkeypatch.setitem(sys.modules, "torchtext.vocab", vocab_module)
    torch.save(vocab_class(), tmp_path / "source_vocab.pt")
    monkeypatch.undo()  # torchtext is gone again, as in a worker
    with pytest.raises(ValueError, match="needs torchtext to load") as info:
        ts.text.load_vocab(str(tmp_path / "source_vocab.pt"))
    assert "source_vocab.pt" in str(info.value) and "get_stoi()" in str(info.value)


@pytest.mark.slow
def test_text_classifier_classifies_a_batch_in_one_call(sentiment: Any) -> None:
    handler = sentiment
    texts = ["what a GREAT film", "boring, awful", "nothing known here"]
    prepared = handler.preprocess([{"body": t.encode()} for t in texts])
    assert prepared.value.offsets.tolist() == [0, 7, 10]  # 4 words + 3 bigrams, 2 + 1, ...
    text_tensor, first_tokens = prepared.value  # TorchServe's (token ids, tokens) pair
    assert len(text_tensor) == 15 and first_tokens == ["what", "a", "great", "film"]
    together = handle(handler, [{"body": t.encode()} for t in texts])
    alone = [handle(handler, [{"data": t}])[0] for t in texts]
    assert len(together) == 3
    for row, single in zip(together, alone, strict=True):
        assert set(row) == {"positive", "negative"}
        assert all(close(row[k], single[k]) for k in row)
    assert together[0]["positive"] > 0.9 and together[1]["negative"] > 0.9
    assert close(together[2]["positive"], 0.5)  # only unknown tokens: no evidence either way


@pytest.fixture
def sentiment(ts: Any, built: Path, tmp_path: Path) -> Any:
    """The TextClassifier on the sentiment model, initialized in this process."""
    return initialized(
        ts.text_classifier.TextClassifier(),
        tmp_path / "model",
        {"modelFile": "text_model.py", "serializedFile": "text_state.pt"},
        TS_MODELS / "text_model.py",
        built / "text_state.pt",
        built / "text" / "source_vocab.pt",
        built / "text" / "index_to_name.json",
    )


@pytest.mark.slow
def test_text_classifier_answers_an_unreadable_text_alone(sentiment: Any) -> None:
    answers = handle(
        sentiment, [{"body": b"good"}, {"body": b"\xff\xfe"}, {"data": {"x": 1}}, {"data": "bad"}]
    )
    assert answers[0]["positive"] > 0.9 and answers[3]["negative"] > 0.9
    assert isinstance(answers[1], EnvelopeInputError) and "not UTF-8" in answers[1].message
    assert isinstance(answers[2], EnvelopeInputError)
    assert "expected a text" in answers[2].message and "not dict" in answers[2].message
    every_one_bad = handle(sentiment, [{"body": b"\xff"}, {"body": 3}])
    assert all(isinstance(a, EnvelopeInputError) for a in every_one_bad)


@pytest.mark.slow
def test_text_classifier_inside_micro_batching_answers_as_without(ts: Any, sentiment: Any) -> None:
    """MicroBatching preprocesses one slice while the one before it is in the model: nothing
    of a slice may live on the handler. 7 texts of different lengths, slices of 2."""
    texts = ["good", "bad awful boring film", "love it", "not good at all, no", "great", "", "x"]
    rows = [{"body": t.encode()} for t in texts]
    alone = handle(sentiment, rows)
    micro = ts.micro.MicroBatching(sentiment, micro_batch_size=2)
    try:
        for _ in range(10):
            context = sentiment.context
            assert micro(rows, context) == alone
    finally:
        micro.shutdown()
