"""caption_match: whether generated captions name the objects of the scene graph, plus text overlap.

A caption matches when the multiset of (color, shape) pairs it names equals the scene's. Also reported:
precision and recall of those mentions over all captions, the rate of captions naming as many objects
as the scene holds, and, given reference captions, corpus BLEU-4 and mean ROUGE-L computed locally.
Load offline by path: `evaluate.load("align/metrics/caption_match")`.
"""

import datasets
import evaluate

from align.metrics.captions import caption_objects, scene_objects
from align.metrics.text_overlap import corpus_bleu, mean_rouge_l

_DESCRIPTION = "Object-level agreement of captions with scene graphs, and BLEU-4 / ROUGE-L against reference captions."
_INPUTS = """
Args:
    predictions (list of str): generated captions.
    references (list of str): the scene graphs (JSON strings, the `scene` column of the world).
    reference_captions (list of str or list of list of str, optional): reference captions for BLEU and ROUGE-L.
Returns:
    caption_match: fraction of captions whose (color, shape) multiset equals the scene's;
    mention_precision, mention_recall, mention_f1: over all captions, (color, shape) mentions that
        match an object of the scene (multiset intersection);
    count_agreement: fraction of captions naming as many objects as the scene holds;
    num_captions;
    bleu, rouge_l: only when reference_captions are given.
Example:
    >>> metric = evaluate.load("align/metrics/caption_match")
    >>> metric.compute(predictions=captions, references=scenes, reference_captions=world_captions)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class CaptionMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, reference_captions=None):
        exact = agree = matched = mentioned = present = 0
        for caption, scene in zip(predictions, references):
            named, truth = caption_objects(caption), scene_objects(scene)
            exact += named == truth
            agree += sum(named.values()) == sum(truth.values())
            matched += sum((named & truth).values())
            mentioned += sum(named.values())
            present += sum(truth.values())
        n = len(predictions)
        precision = matched / mentioned if mentioned else 0.0
        recall = matched / present if present else 0.0
        result = {
            "caption_match": exact / n if n else 0.0,
            "mention_precision": precision,
            "mention_recall": recall,
            "mention_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "count_agreement": agree / n if n else 0.0,
            "num_captions": n,
        }
        if reference_captions is not None:
            result["bleu"] = corpus_bleu(predictions, reference_captions)["bleu"]
            result["rouge_l"] = mean_rouge_l(predictions, reference_captions)
        return result
