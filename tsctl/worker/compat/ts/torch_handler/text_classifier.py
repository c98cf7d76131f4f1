"""`TextClassifier`: TorchServe's default text classification handler, without torchtext.

Each request is a text (the `data` field or the body). It is cleaned as TorchServe cleans it
(HTML removed, lowercased, contractions expanded, accents and punctuation removed), split
into words, extended with its bigrams (`ngrams` = 2) and looked up in the archive's
vocabulary (see `ts.torch_handler.text_handler` for the vocabulary forms tsctl reads). The
model is called as `model(token_ids, offsets)`, the form of an `nn.EmbeddingBag` model, and
each text is answered with every class's probability, `{label: probability}`, labels from
`index_to_name.json` when the archive has one.

TorchServe's handler reads only the first request of a batch; this one classifies every
request of the batch in one call (one bag per text, as `offsets` allows). A request that is
not a UTF-8 text is answered 400 alone; the others are classified as usual. Every value of a
batch travels in what `preprocess` returns (a `TokenBatch`, which unpacks as TorchServe's
`(token_ids, tokens)` pair), never on the handler, so it is safe inside `MicroBatching`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ts.torch_handler._per_request import Carried, gather, request_value
from ts.torch_handler.text_handler import TextHandler, TokenBatch, Vocab, ngrams_iterator
from ts.torch_handler.vision_handler import captum_attr
from ts.utils.util import map_class_to_label
from tsctl.worker.envelope import EnvelopeInputError

logger = logging.getLogger(__name__)


def request_text(row: Any) -> str:
    """The text of one request: its `data` field or body, as UTF-8; an `EnvelopeInputError`
    when it is not one."""
    text = request_value(row)
    if isinstance(text, (bytes, bytearray)):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EnvelopeInputError(f"the text is not UTF-8 ({exc})") from exc
    if not isinstance(text, str):
        raise EnvelopeInputError(
            f"expected a text (the body or a field named 'data'), not {type(text).__name__}"
        )
    return text


class TextClassifier(TextHandler):
    """Texts in, each class's probability per text out."""

    ngrams = 2

    def clean(self, text: str) -> list[str]:
        """TorchServe's clean-up steps, then the tokenizer."""
        text = self._remove_html_tags(text)
        text = text.lower()
        text = self._expand_contractions(text)
        text = self._remove_accented_characters(text)
        text = self._remove_puncutation(text)
        return self._tokenize(text)

    def token_ids(self, tokens: list[str]) -> list[int]:
        """The vocabulary ids of the tokens and their n-grams (unknown ones dropped when the
        vocabulary has no `<unk>`)."""
        grams = ngrams_iterator(tokens, self.ngrams)
        vocab = self.source_vocab
        if isinstance(vocab, Vocab):
            return [i for i in map(vocab.get, grams) if i is not None]
        return [int(vocab[gram]) for gram in grams]

    def preprocess(self, data: list[Any]) -> Carried:
        """Every readable text's token ids in one `TokenBatch`; each unreadable one an error."""
        per_request: list[list[list[str]] | EnvelopeInputError] = []
        for row in data:
            try:
                per_request.append([self.clean(request_text(row))])
            except EnvelopeInputError as exc:
                per_request.append(exc)
        texts, layout = gather(per_request)
        ids = [self.token_ids(tokens) for tokens in texts]
        starts = [0]
        for row_ids in ids[:-1]:
            starts.append(starts[-1] + len(row_ids))
        offsets = torch.as_tensor(starts, dtype=torch.long, device=self.device)
        flat = torch.as_tensor([i for row_ids in ids for i in row_ids], dtype=torch.long)
        return Carried(TokenBatch(flat.to(self.device), offsets, texts), layout)

    def inference(self, data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`model(token_ids, offsets)`; one bag (offsets `[0]`) for a plain TorchServe pair."""
        text_tensor, _ = data
        offsets = getattr(data, "offsets", None)
        if offsets is None:
            offsets = torch.as_tensor([0], device=self.device)
        result: torch.Tensor = super().inference(text_tensor, offsets.to(self.device))
        return result

    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        """Softmax over the classes; each text's `{label: probability}`."""
        if data.dim() == 1:
            data = data.unsqueeze(0)
        probabilities: list[Any] = torch.softmax(data, dim=1).tolist()
        return map_class_to_label(probabilities, self.mapping)

    def get_insights(self, text_preprocess: Any, _: Any, target: Any = 0) -> list[dict[str, Any]]:
        """Each word's importance for class `target` in the first text (captum)."""
        text_tensor, all_tokens = text_preprocess
        offsets = getattr(text_preprocess, "offsets", None)
        if offsets is not None and len(offsets) > 1:
            text_tensor = text_tensor[: int(offsets[1])]
        references = captum_attr().TokenReferenceBase()
        reference = references.generate_reference(text_tensor.shape[0], device=self.device)
        attributions = self.lig.attribute(
            text_tensor,
            reference.squeeze(0),
            additional_forward_args=(torch.as_tensor([0], device=self.device),),
            return_convergence_delta=False,
            target=target,
        )
        summary = self.summarize_attributions(attributions)
        return [{"importances": summary.tolist(), "words": self.get_word_token(all_tokens)}]
