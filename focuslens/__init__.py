"""focuslens: find the attention heads that read the relevant document, and steer them.

An implementation of *Focus Directions Make Your Language Models Pay More Attention to
Relevant Contexts* (Zhu et al., 2025) on TransformerLens' ``TransformerBridge``.

>>> import focuslens as fl                                    # doctest: +SKIP
>>> model = fl.load_model("smollm2-135m-instruct")            # doctest: +SKIP
>>> examples = fl.make_synthetic_qa(100, n_documents=20)      # doctest: +SKIP
>>> fl.evaluate_next_token(model, examples).correct.mean()    # doctest: +SKIP
>>> ranking = fl.score_heads(model, examples[:80]).ranking()   # doctest: +SKIP
>>> dirs = fl.train_directions(model, examples[:80], examples[80:], ranking=ranking)  # doctest: +SKIP
>>> with fl.focus(model, dirs, alpha=0.5, heads=20):          # doctest: +SKIP
...     fl.evaluate_next_token(model, examples).correct.mean()
"""

from focuslens.data import Document, Prompt, QAExample, Span, make_synthetic_qa, render
from focuslens.directions.artifact import FocusDirections, import_release
from focuslens.directions.train import train_directions
from focuslens.errors import DataError, FocusLensError, ModelError
from focuslens.measure.distraction import distraction
from focuslens.measure.evaluate import evaluate_generation, evaluate_next_token
from focuslens.measure.scoring import HeadScores, score_heads
from focuslens.model.load import load_model
from focuslens.steer.focus import focus
from focuslens.steer.split_softmax import split_softmax

__version__ = "0.1.0"

# the names a notebook needs; the rest live in their modules (focuslens.data, .eval, .patching, ...)
__all__ = [
    "load_model",
    "QAExample",
    "Document",
    "Prompt",
    "Span",
    "render",
    "make_synthetic_qa",
    "evaluate_next_token",
    "evaluate_generation",
    "distraction",
    "score_heads",
    "HeadScores",
    "split_softmax",
    "FocusDirections",
    "train_directions",
    "focus",
    "import_release",
    "FocusLensError",
    "DataError",
    "ModelError",
]
