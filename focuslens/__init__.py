"""focuslens: find the attention heads that read the relevant document, and steer them.

An implementation of *Focus Directions Make Your Language Models Pay More Attention to
Relevant Contexts* (Zhu et al., 2025) on TransformerLens' ``TransformerBridge``.

The package is the method's data flow, one folder per step (``fl.<folder>`` works after
``import focuslens as fl``): :mod:`~focuslens.data` (examples, prompts with exact spans,
splits) → :mod:`~focuslens.model` (load, hook points, head selection, rows and spans,
prefix cache, decoding) → :mod:`~focuslens.measure` (evaluation, the recorder, head
scores, statistics) → :mod:`~focuslens.causal` (patching, ablation),
:mod:`~focuslens.directions` (the artifact and its training) → :mod:`~focuslens.steer`
(interventions and their sweeps) → :mod:`~focuslens.viz` (figures) →
:mod:`~focuslens.experiments` (stages, the demo, the CLI).

>>> import focuslens as fl                                                # doctest: +SKIP
>>> model = fl.load_model("smollm2-135m-instruct")                        # doctest: +SKIP
>>> examples = fl.make_synthetic_qa(100, n_documents=20)                  # doctest: +SKIP
>>> fl.evaluate_next_token(model, examples).correct.mean()                # doctest: +SKIP
>>> scores = fl.score_heads(model, examples[:80])                         # doctest: +SKIP
>>> fix = fl.SplitSoftmax(20, ranking=scores, tau=0.1)                     # needs the label  # doctest: +SKIP
>>> fl.evaluate_next_token(model, examples[80:], intervention=fix).correct.mean()       # doctest: +SKIP
>>> dirs = fl.train_directions(model, examples[:60], examples[60:80], ranking=scores)  # doctest: +SKIP
>>> fl.evaluate_next_token(model, examples[80:], intervention=fl.Focus(dirs, alpha=0.5)).correct.mean()  # doctest: +SKIP
"""

from focuslens import causal, data, directions, measure, model, steer, viz  # noqa: F401  (fl.<folder>)
from focuslens.data import Prompt, QAExample, Span, make_synthetic_qa, render
from focuslens.directions import FocusDirections, import_release, train_directions
from focuslens.errors import DataError, FocusLensError, ModelError
from focuslens.measure import HeadScores, evaluate_generation, evaluate_next_token, score_heads
from focuslens.measure.distraction import distraction
from focuslens.measure.record import record
from focuslens.model import load_model
from focuslens.steer import Focus, SplitSoftmax, focus, split_softmax

__version__ = "0.1.0"

# The names a notebook starts from; everything else is one folder away (fl.causal.patch_heads,
# fl.steer.focus_sweep, fl.viz.plot_head_locations, ...). README "Concepts" lists them all.
__all__ = [
    "load_model",
    "QAExample",
    "Prompt",
    "Span",
    "make_synthetic_qa",
    "render",
    "evaluate_next_token",
    "evaluate_generation",
    "distraction",
    "score_heads",
    "HeadScores",
    "record",
    "SplitSoftmax",
    "split_softmax",
    "Focus",
    "focus",
    "FocusDirections",
    "train_directions",
    "import_release",
    "FocusLensError",
    "DataError",
    "ModelError",
]
